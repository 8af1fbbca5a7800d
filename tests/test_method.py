"""The `domain_instruct` kernel on in-memory tensors, against independent computations."""

import pytest
import torch
from mergekit.merge_methods import merge_state_dicts, merge_tensors

from finmerge.plugins import method as method_module
from finmerge.plugins.method import NonFiniteTensorError, domain_instruct_merge
from finmerge.plugins.merge_context import MergeContext, merging


def _models(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    base = {"embed.weight": rand(50, 8), "layers.0.q_proj.weight": rand(8, 8), "norm.weight": rand(8)}
    domain = {k: v + 0.1 * rand(*v.shape) for k, v in base.items()}
    instruct = {k: v + 0.1 * rand(*v.shape) for k, v in base.items()}
    return {"base": base, "domain": domain, "instruct": instruct}


ROLES = {"role": {"domain": "domain", "instruct": "instruct"}}


def _merge(models, weights=None, **kwargs):
    parameters = dict(ROLES)
    if weights is not None:
        parameters["weight"] = weights
    return merge_state_dicts(models, domain_instruct_merge, parameters=parameters, base="base", **kwargs)


def test_equals_task_arithmetic_at_unit_weights():
    models = _models()
    ours = _merge(models)
    reference = merge_state_dicts(
        models, "task_arithmetic", parameters={"weight": {"domain": 1.0, "instruct": 1.0}}, base="base"
    )
    for name in ours:
        assert torch.allclose(ours[name], reference[name], atol=1e-6, rtol=0), name


@pytest.mark.parametrize("w_d,w_i", [(1.0, 1.0), (0.7, 1.3), (0.0, 1.0), (1.0, 0.0), (-0.5, 2.0)])
def test_matches_formula(w_d, w_i):
    models = _models()
    ours = _merge(models, {"domain": w_d, "instruct": w_i})
    for name, base in models["base"].items():
        expected = base + w_d * (models["domain"][name] - base) + w_i * (models["instruct"][name] - base)
        assert torch.allclose(ours[name], expected, atol=1e-6, rtol=0), name


def test_model_order_does_not_matter():
    models = _models()
    reordered = {"instruct": models["instruct"], "base": models["base"], "domain": models["domain"]}
    a, b = _merge(models, {"domain": 0.3, "instruct": 0.9}), _merge(reordered, {"domain": 0.3, "instruct": 0.9})
    for name in a:
        assert torch.equal(a[name], b[name])


def test_fp64_inputs_are_computed_in_fp64():
    models = _models(torch.float64)
    ours = _merge(models, {"domain": 0.3, "instruct": 0.9})
    for name, base in models["base"].items():
        expected = base + 0.3 * (models["domain"][name] - base) + 0.9 * (models["instruct"][name] - base)
        assert ours[name].dtype == torch.float64
        assert torch.allclose(ours[name], expected, atol=1e-13, rtol=0)


def test_bf16_inputs_computed_in_fp32_and_cast_back():
    models = _models(torch.bfloat16)
    ours = _merge(models, {"domain": 0.5, "instruct": 1.5})
    for name, base in models["base"].items():
        b, d, i = (m[name].float() for m in (models["base"], models["domain"], models["instruct"]))
        expected = (b + 0.5 * (d - b) + 1.5 * (i - b)).to(torch.bfloat16)
        assert ours[name].dtype == torch.bfloat16
        assert torch.equal(ours[name], expected), name


def test_chunked_result_equals_unchunked(monkeypatch):
    models = _models()
    whole = _merge(models, {"domain": 0.4, "instruct": 1.1})
    monkeypatch.setattr(method_module, "_CHUNK_ELEMENTS", 7)  # not a divisor of any tensor size
    chunked = _merge(models, {"domain": 0.4, "instruct": 1.1})
    for name in whole:
        assert torch.equal(whole[name], chunked[name]), name


def test_non_contiguous_input():
    base = torch.randn(6, 4)
    domain, instruct = base + 1, base + 2
    result = merge_tensors(
        [base.t(), domain.t(), instruct.t()], domain_instruct_merge, ids=["b", "d", "i"], base_index=0,
        parameters={"role": {"d": "domain", "i": "instruct"}},
    )
    assert torch.allclose(result, base.t() + 3)


@pytest.mark.parametrize("which", ["base", "domain", "instruct"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_names_model_and_tensor(which, bad):
    models = _models()
    models[which]["layers.0.q_proj.weight"][3, 2] = bad
    with pytest.raises(NonFiniteTensorError, match=rf"model {which} .*layers\.0\.q_proj\.weight"):
        _merge(models)


@pytest.mark.parametrize(
    "roles,message",
    [
        ({"domain": "domain", "instruct": "domain"}, "exactly one model with role 'domain'"),
        ({"domain": "instruct", "instruct": "instruct"}, "exactly one model with role 'domain'"),
    ],
)
def test_roles_must_be_one_of_each(roles, message):
    with pytest.raises(ValueError, match=message) as error:
        merge_state_dicts(_models(), domain_instruct_merge, parameters={"role": roles}, base="base")
    assert "domain: " in str(error.value) and "instruct: " in str(error.value)  # names the models


def test_unknown_role_rejected_by_parameter_validation():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        merge_state_dicts(_models(), domain_instruct_merge,
                          parameters={"role": {"domain": "domain", "instruct": "chat"}}, base="base")
    message = str(caught.value)
    # the user sees the value they wrote and the two values allowed
    assert "'chat'" in message and "'domain' or 'instruct'" in message


def test_needs_base_and_two_models():
    models = _models()
    with pytest.raises(ValueError, match="requires a base input"):
        merge_state_dicts(models, domain_instruct_merge, parameters=ROLES)
    del models["instruct"]
    with pytest.raises(ValueError, match=r"requires at least 2 non-base inputs; got 1"):
        merge_state_dicts(models, domain_instruct_merge, parameters={"role": {"domain": "domain"}}, base="base")


def test_registered_by_name_and_idempotent():
    from mergekit import merge_methods

    import finmerge.plugins

    finmerge.plugins.register()
    finmerge.plugins.register()
    names = [m.spec.name for m in merge_methods.registered_methods()]
    assert names.count("domain_instruct") == 1
    assert merge_methods.get("domain_instruct") is domain_instruct_merge


def test_inputs_are_not_modified():
    models = _models()
    before = {role: {k: v.clone() for k, v in sd.items()} for role, sd in models.items()}
    _merge(models, {"domain": 0.5, "instruct": 2.0})
    for role, state_dict in models.items():
        for name, tensor in state_dict.items():
            assert torch.equal(tensor, before[role][name]), (role, name)


# --- instruct_rows: chosen vocabulary rows take only the instruction vector ---------------------

def _with_llama_embedding_name(models):
    """The token embedding under its Llama name (the in-memory API has no vocabulary metadata)."""
    return {label: {("model.embed_tokens.weight" if k == "embed.weight" else k): v for k, v in m.items()}
            for label, m in models.items()}


def test_instruct_rows_take_only_the_instruction_vector():
    models = _with_llama_embedding_name(_models())
    rows = [3, 7, 41]
    ours = merge_state_dicts(models, domain_instruct_merge, base="base",
                             parameters={**ROLES, "weight": {"domain": 0.8, "instruct": 1.2}, "instruct_rows": "41, 3,7"})
    b, d, i = (m["model.embed_tokens.weight"] for m in (models["base"], models["domain"], models["instruct"]))
    summed = b + 0.8 * (d - b) + 1.2 * (i - b)
    instruct_only = b + 1.2 * (i - b)
    other = [r for r in range(b.shape[0]) if r not in rows]
    assert torch.allclose(ours["model.embed_tokens.weight"][rows], instruct_only[rows], atol=1e-6, rtol=0)
    assert torch.allclose(ours["model.embed_tokens.weight"][other], summed[other], atol=1e-6, rtol=0)
    # tensors without a vocabulary axis are the plain formula
    for name in ("layers.0.q_proj.weight", "norm.weight"):
        b, d, i = (m[name] for m in (models["base"], models["domain"], models["instruct"]))
        assert torch.allclose(ours[name], b + 0.8 * (d - b) + 1.2 * (i - b), atol=1e-6, rtol=0)


def test_instruct_rows_follow_mergekit_vocabulary_axis():
    """lm_head stored as [hidden, vocab] (axis 1): the metadata's axis decides, not the name."""
    generator = torch.Generator().manual_seed(3)
    b, d, i = (torch.randn(8, 20, generator=generator) for _ in range(3))
    from mergekit.merge_methods.base import TensorGroup

    group = TensorGroup.from_tensors([b, d, i], ids=["base", "domain", "instruct"], base_index=0,
                                     name="lm_head.weight", vocabulary_axis=1)
    (out,) = domain_instruct_merge((group,), parameters={**ROLES, "instruct_rows": "5"})
    expected = b + (d - b) + (i - b)
    expected[:, 5] = i[:, 5]
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rows,message", [("3,x", "comma-separated token ids"), ("-1", "comma-separated"),
                                          ("50", "has only 50 rows")])
def test_instruct_rows_bad_values(rows, message):
    with pytest.raises(method_module.InstructRowsError, match=message):
        merge_state_dicts(_with_llama_embedding_name(_models()), domain_instruct_merge, base="base", parameters={**ROLES, "instruct_rows": rows})


# --- overflow: finite inputs whose merge does not fit the output dtype -------------------------

def test_fp16_overflow_is_refused_not_written_as_inf():
    base = {"w": torch.full((4,), 30000.0, dtype=torch.float16)}
    models = {"base": base, "domain": {"w": base["w"] + 20000}, "instruct": {"w": base["w"] + 20000}}
    assert all(torch.isfinite(m["w"]).all() for m in models.values())
    # mergekit's own task_arithmetic writes Inf here: the reason for the check
    reference = merge_state_dicts(models, "task_arithmetic", parameters={"weight": {"domain": 1.0, "instruct": 1.0}}, base="base")
    assert torch.isinf(reference["w"]).all()
    with pytest.raises(method_module.OverflowTensorError, match="tensor w.*65504"):
        merge_state_dicts(models, domain_instruct_merge, parameters=ROLES, base="base")


def test_overflow_at_the_saved_dtype_is_refused():
    base = {"w": torch.full((4,), 30000.0)}
    models = {"base": base, "domain": {"w": base["w"] + 20000}, "instruct": {"w": base["w"] + 20000}}
    assert torch.isfinite(merge_state_dicts(models, domain_instruct_merge, parameters=ROLES, base="base")["w"]).all()
    with merging(MergeContext(saved_dtype=torch.float16)):
        with pytest.raises(method_module.OverflowTensorError):
            merge_state_dicts(models, domain_instruct_merge, parameters=ROLES, base="base")
    with merging(MergeContext(saved_dtype=torch.bfloat16)):  # bf16 has fp32's range: fine
        merge_state_dicts(models, domain_instruct_merge, parameters=ROLES, base="base")


def test_instruct_rows_through_a_real_merge(tiny_family, tmp_path):
    """mergekit's planner supplies the vocabulary axis: embedding and lm_head rows, nothing else."""
    from merge_helpers import expected_merge, run_merge, tensors

    rows = [1, 2, 3]
    recipe = {
        "merge_method": "domain_instruct", "base_model": tiny_family.base, "dtype": "float32",
        "parameters": {"instruct_rows": ",".join(map(str, rows))},
        "models": [{"model": tiny_family.domain, "parameters": {"role": "domain", "weight": 1.0}},
                   {"model": tiny_family.instruct, "parameters": {"role": "instruct", "weight": 1.0}}],
    }
    run_merge(recipe, tmp_path / "out")
    merged, summed = tensors(tmp_path / "out"), expected_merge(tiny_family)
    instruct = tensors(tiny_family.instruct)
    vocab_tensors = [n for n in summed if n.endswith(("embed_tokens.weight", "lm_head.weight"))]
    assert len(vocab_tensors) == 2
    for name, expected in summed.items():
        if name in vocab_tensors:
            expected = expected.clone()
            expected[rows] = instruct[name][rows]  # base + 1·τ_i
            assert not torch.allclose(summed[name][rows], instruct[name][rows], atol=1e-6)
        assert torch.allclose(merged[name], expected, atol=1e-6, rtol=0), name


def test_overflow_at_a_recipes_out_dtype_stops_the_merge(tiny_family, tmp_path):
    """fp32 inputs, `out_dtype: float16`: mergekit would cast 80000 to Inf after the kernel returned."""
    from merge_helpers import copy_model, run_merge

    name = "model.norm.weight"

    def big(state):
        state[name] = torch.full_like(state[name], 40000.0)

    domain = copy_model(tiny_family.domain, tmp_path / "domain", edit_tensors=big)
    instruct = copy_model(tiny_family.instruct, tmp_path / "instruct", edit_tensors=big)
    recipe = {
        "merge_method": "domain_instruct", "base_model": tiny_family.base, "dtype": "float32", "out_dtype": "float16",
        "models": [{"model": domain, "parameters": {"role": "domain"}}, {"model": instruct, "parameters": {"role": "instruct"}}],
    }
    with pytest.raises(method_module.OverflowTensorError, match=name):
        run_merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    run_merge({**recipe, "out_dtype": "float32"}, tmp_path / "out32")  # fits: merged normally
