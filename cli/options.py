"""Option types shared by the `finmerge` commands, so each is spelled and checked the same way everywhere."""

from typing import Callable, Iterable, Union

import click

from finmerge.safety.dtypes import dtype_name, spellings
from finmerge.safety.errors import InputError


class CommaList(click.ParamType):
    """`a,b,c` -> [a, b, c] (empty items dropped), each item converted by `item` (a function or a click type such
    as click.Choice, whose own message then names the option); `required_items`: at least one."""

    name = "list"

    def __init__(self, item: Union[Callable[[str], object], click.ParamType] = str, example: str = "a,b",
                 required_items: bool = False):
        self.item, self.example, self.required_items = item, example, required_items

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        parts = [v.strip() for v in str(value).split(",") if v.strip()]
        if isinstance(self.item, click.ParamType):
            items = [self.item.convert(v, param, ctx) for v in parts]
        else:
            try:
                items = [self.item(v) for v in parts]
            except ValueError:
                kind = {float: "number", int: "integer"}.get(self.item, getattr(self.item, "__name__", "value"))
                self.fail(f"{value!r} is not a comma-separated list of {kind}s, e.g. {self.example}", param, ctx)
        if self.required_items and not items:
            self.fail(f"give at least one value, e.g. {self.example}", param, ctx)
        return items


class Dtype(click.ParamType):
    """A dtype as torch, mergekit or the short names spell it (`bfloat16` = `bf16`); the value is torch's name."""

    name = "dtype"

    def __init__(self, allowed: Iterable[str]):
        self.allowed = tuple(allowed)

    def get_metavar(self, param, ctx=None):
        return "[" + "|".join(self.allowed) + "]"

    def convert(self, value, param, ctx):
        try:
            return dtype_name(value, self.allowed, what="")
        except InputError:
            self.fail(f"{value!r} is not a dtype; use one of {spellings(self.allowed)}", param, ctx)

