"""Nothing lost, nothing run unasked: the rules every finmerge command follows.

- `errors`: `InputError`, the base of every "bad input" error; `finmerge` prints its message, never a traceback.
- `flags`: options that let code or pickles in (`trust_remote_code`, `allow_pickle`) come from the
  command line only; a recipe or config that sets them is refused, naming the key.
- `outputs`: a command writes and deletes only folders it created (a marker file says so), never an
  input, the workdir or one of its ancestors; files are written atomically.
- `hub`: is a string a Hugging Face hub id or a local path (huggingface_hub's own validator).
"""
