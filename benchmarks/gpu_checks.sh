#!/usr/bin/env bash
# What only a CUDA machine can check, in one go (about 10 minutes on one GPU; not part of `make test`).
#
#   benchmarks/gpu_checks.sh             run every check; one line per check; exit 1 if any failed
#   benchmarks/gpu_checks.sh --dry-run   no GPU needed: list the checks, check the tools exist, build the
#                                        tiny models and data the checks use, then stop
#
# Checks (each under its own time limit; the whole script stays within GPU_CHECKS_BUDGET seconds, 600):
#   fsdp_pretrain   `torchrun --nproc_per_node 1 -m finmerge.cli.main pretrain --fsdp ...` finishes: one CUDA
#                   process launched by torchrun is a distributed run, so accelerate turns FSDP on (on CPU it
#                   would not, and finmerge refuses an FSDP request that would run unsharded)
#   fsdp_save       its OUT/model*.safetensors is a full, unsharded checkpoint: every tensor of the base, same
#                   names and shapes, finite, and changed by training
#   fsdp_resume     the same run SIGKILLed after a checkpoint and rerun equals the uninterrupted run (weights
#                   within GPU_RESUME_TOL, default 1e-4; the rerun must resume from a checkpoint)
#   eval_cuda_bf16  `finmerge eval --device cuda --dtype bf16` agrees with `--device cpu --dtype bf16` on the
#                   same tiny models (bits per byte within 2 %); fp32 within 0.1 % and the same multiple-choice answers
#   merge_cuda      `mergekit-yaml --cuda` with a domain_instruct recipe equals the CPU merge of the same recipe
#
# Environment: PYTHON (default .venv/bin/python of this checkout), GPU_CHECKS_DIR (scratch folder, default a
# new temporary one, removed at the end unless GPU_CHECKS_KEEP=1), GPU_CHECKS_BUDGET (seconds, 600).
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
BIN="$(dirname "$PYTHON")"
BUDGET="${GPU_CHECKS_BUDGET:-600}"
# CUDA adds some gradients (e.g. the embedding's) in a nondeterministic order: no bit-identity expected
RESUME_TOL="${GPU_RESUME_TOL:-1e-4}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "unknown option $1 (use --dry-run or --help)" >&2; exit 2 ;;
esac

START=$SECONDS
FAILED=0
pass() { printf 'PASS  %-15s %s\n' "$1" "$2"; }
fail() { printf 'FAIL  %-15s %s\n' "$1" "$2"; FAILED=1; }
left() { echo $(( BUDGET - (SECONDS - START) )); }
# run a command under the smaller of its own limit and what is left of the budget; output to a log file
limited() {  # limited SECONDS LOG command...
  local limit=$1 log=$2; shift 2
  local rest; rest=$(left)
  (( rest < limit )) && limit=$rest
  (( limit < 10 )) && { echo "time budget used up" >"$log"; return 124; }
  timeout --signal=TERM --kill-after=20 "$limit" "$@" >"$log" 2>&1
}

for tool in "$PYTHON" "$BIN/finmerge" "$BIN/mergekit-yaml" "$BIN/torchrun"; do
  [[ -x "$tool" ]] || { echo "FAIL  setup           $tool not found (run 'make setup' first)"; exit 1; }
done

WORK="${GPU_CHECKS_DIR:-}"
if [[ -z "$WORK" ]]; then
  WORK="$(mktemp -d -t finmerge-gpu-checks-XXXXXX)"
  [[ "${GPU_CHECKS_KEEP:-0}" == 1 ]] || trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK"
# the checks below compare checkpoints tensor by tensor; each loads them with this
cat > "$WORK/check_weights.py" <<'EOF'
import glob, os
from safetensors.torch import load_file
def weights(folder):
    state = {}
    for file in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        state.update(load_file(file))
    return state
EOF
export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"
echo "scratch: $WORK"

# ---- tiny models and data (CPU; also what --dry-run exercises) -------------------------------------------
if ! limited 300 "$WORK/setup.log" "$PYTHON" - "$WORK" "$ROOT/tests" <<'EOF'
import json, os, sys
work, tests = sys.argv[1], sys.argv[2]
sys.path.insert(0, tests)
from finmerge.demo.tiny_models import build_tiny_family, recipe
from pretrain_fixtures import finance_documents, write_jsonl
import yaml
family = build_tiny_family(os.path.join(work, "tiny"))
write_jsonl(os.path.join(work, "corpus.jsonl"), finance_documents(400, seed=1))
with open(os.path.join(work, "heldout.txt"), "w", encoding="utf-8") as handle:
    handle.write("\n\n".join(finance_documents(40, seed=2)))
with open(os.path.join(work, "qa.jsonl"), "w", encoding="utf-8") as handle:
    for question, answer in [("What is a bond?", "A loan."), ("What is a stock?", "A share."),
                             ("What does a bank pay on deposits?", "Interest.")]:
        handle.write(json.dumps({"question": question, "answer": answer,
                                 "choices": [answer, "A car.", "A tree."]}) + "\n")
with open(os.path.join(work, "merge.yml"), "w", encoding="utf-8") as handle:
    yaml.safe_dump(recipe(family, 1.0, 1.0, dtype="float32"), handle)
with open(os.path.join(work, "fsdp_config.json"), "w", encoding="utf-8") as handle:
    json.dump({"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}, handle)
print("ok")
EOF
then
  fail setup "building the tiny models failed: $(tail -3 "$WORK/setup.log")"
  exit 1
fi

pretrain() {  # pretrain OUT LOG
  limited 240 "$2" "$BIN/torchrun" --standalone --nproc_per_node 1 -m finmerge.cli.main pretrain \
    --model "$WORK/tiny/base" --data "$WORK/corpus.jsonl" --output "$1" --seq_len 64 --max_steps 40 \
    --per_device_train_batch_size 4 --learning_rate 3e-3 --save_steps 10 --logging_steps 5 --seed 0 \
    --fsdp "full_shard auto_wrap" --fsdp_config "$WORK/fsdp_config.json" --bf16 false
}

if (( DRY_RUN )); then
  echo "dry run: tools found, tiny models and data built under $WORK"
  # the FSDP command line itself, on CPU: parsed, wrap class accepted, then refused as unsharded
  pretrain "$WORK/dry" "$WORK/dry.log"
  if grep -q "FSDP is requested" "$WORK/dry.log" && [[ ! -e "$WORK/dry/model.safetensors" ]]; then
    echo "dry run: the fsdp_pretrain command is accepted and, on CPU, refused before training (as it should be)"
  else
    echo "dry run: the fsdp_pretrain command did not reach finmerge's FSDP check: $(tail -3 "$WORK/dry.log")"
    exit 1
  fi
  echo "would run: fsdp_pretrain fsdp_save fsdp_resume eval_cuda_bf16 merge_cuda (budget ${BUDGET}s)"
  exit 0
fi

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "FAIL  setup           no CUDA GPU visible to torch (torch.cuda.is_available() is False)"
  exit 1
fi
"$PYTHON" -c 'import torch; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'

# ---- FSDP pretraining through torchrun, one CUDA process -------------------------------------------------
if pretrain "$WORK/whole" "$WORK/whole.log"; then
  pass fsdp_pretrain "40 steps under FSDP (one CUDA process, torchrun)"
else
  fail fsdp_pretrain "exit $?: $(tail -3 "$WORK/whole.log" | tr '\n' ' ')"
fi

if [[ -f "$WORK/whole/training_summary.json" ]]; then
  if message=$("$PYTHON" - "$WORK/tiny/base" "$WORK/whole" <<'EOF' 2>&1
import sys
import torch
from check_weights import weights  # written into $WORK above
base, trained = weights(sys.argv[1]), weights(sys.argv[2])
missing = sorted(set(base) - set(trained))
assert not missing, f"missing tensors {missing[:3]}"
wrong = [n for n in base if trained[n].shape != base[n].shape]
assert not wrong, f"sharded/flattened shapes {[(n, tuple(trained[n].shape)) for n in wrong[:3]]}"
assert all(torch.isfinite(t.float()).all() for t in trained.values()), "non-finite weights"
changed = sum(not torch.equal(base[n].float(), trained[n].float()) for n in base)
assert changed > len(base) // 2, f"only {changed} of {len(base)} tensors changed"
print(f"{len(trained)} tensors, full shapes, {changed} changed by training")
EOF
  ); then pass fsdp_save "$message"; else fail fsdp_save "$(echo "$message" | tail -1)"; fi
else
  fail fsdp_save "no finished run to inspect"
fi

# ---- kill after a checkpoint, rerun: equal to the uninterrupted run --------------------------------------
"$BIN/torchrun" --standalone --nproc_per_node 1 -m finmerge.cli.main pretrain \
  --model "$WORK/tiny/base" --data "$WORK/corpus.jsonl" --output "$WORK/broken" --seq_len 64 --max_steps 40 \
  --per_device_train_batch_size 4 --learning_rate 3e-3 --save_steps 10 --logging_steps 5 --seed 0 \
  --fsdp "full_shard auto_wrap" --fsdp_config "$WORK/fsdp_config.json" --bf16 false >"$WORK/broken.log" 2>&1 &
LAUNCHER=$!
deadline=$(( SECONDS + 180 ))
until [[ -f "$WORK/broken/checkpoints/checkpoint-20/trainer_state.json" ]] || ! kill -0 "$LAUNCHER" 2>/dev/null \
      || (( SECONDS > deadline )); do sleep 0.05; done
# SIGKILL the workers this launcher started (by its pid), then the launcher: no clean shutdown, as in a crash
pkill -KILL -P "$LAUNCHER" 2>/dev/null; kill -KILL "$LAUNCHER" 2>/dev/null; wait "$LAUNCHER" 2>/dev/null
if [[ -f "$WORK/broken/training_summary.json" ]]; then
  fail fsdp_resume "the run finished before it could be killed (no resume tested)"
elif pretrain "$WORK/broken" "$WORK/resumed.log"; then
  if message=$("$PYTHON" - "$WORK/whole" "$WORK/broken" "$RESUME_TOL" <<'EOF' 2>&1
import json, os, sys
import torch
from check_weights import weights  # written into $WORK above
whole, resumed, tol = weights(sys.argv[1]), weights(sys.argv[2]), float(sys.argv[3])
summary = json.load(open(os.path.join(sys.argv[2], "training_summary.json")))
assert summary.get("resumed_from"), "the rerun did not resume from a checkpoint"
assert whole.keys() == resumed.keys()
diff = max((whole[n].float() - resumed[n].float()).abs().max().item() for n in whole)
exact = all(torch.equal(whole[n], resumed[n]) for n in whole)
assert diff <= tol, f"max |whole - resumed| = {diff:.3g} > {tol}"
print(f"resumed from {summary['resumed_from']}; max |difference| {diff:.3g} ({'bit-identical' if exact else 'within tolerance'})")
EOF
  ); then pass fsdp_resume "$message"; else fail fsdp_resume "$(echo "$message" | tail -1)"; fi
else
  fail fsdp_resume "rerun failed: $(tail -3 "$WORK/resumed.log" | tr '\n' ' ')"
fi

# ---- evaluation on CUDA against CPU ------------------------------------------------------------------------
evaluate() {  # evaluate DEVICE DTYPE
  limited 120 "$WORK/eval-$1-$2.log" "$BIN/finmerge" eval "base=$WORK/tiny/base" "instruct=$WORK/tiny/instruct" \
    --text "$WORK/heldout.txt" --qa "$WORK/qa.jsonl" --device "$1" --dtype "$2" --out "$WORK/eval-$1-$2.json"
}
if evaluate cpu bf16 && evaluate cuda bf16 && evaluate cpu fp32 && evaluate cuda fp32; then
  if message=$("$PYTHON" - "$WORK" <<'EOF' 2>&1
import json, os, sys
work = sys.argv[1]
load = lambda d, t: json.load(open(os.path.join(work, f"eval-{d}-{t}.json")))
notes = []
for dtype, tol in (("bf16", 0.02), ("fp32", 0.001)):
    cpu, cuda = load("cpu", dtype), load("cuda", dtype)
    for model in cpu:
        assert cuda[model]["device"].startswith("cuda"), f"{model} ran on {cuda[model]['device']}"
        a, b = cpu[model]["domain"]["bits_per_byte"], cuda[model]["domain"]["bits_per_byte"]
        assert abs(a - b) <= tol * a, f"{model} {dtype}: bits/byte cpu {a:.4f} vs cuda {b:.4f}"
        if dtype == "fp32":  # bf16 rounding may flip a near-tie between choices
            assert cpu[model]["qa"]["choice_accuracy"] == cuda[model]["qa"]["choice_accuracy"], f"{model}: MC answers differ"
        notes.append(f"{model} {dtype} {a:.4f}/{b:.4f}")
print("bits/byte cpu/cuda: " + ", ".join(notes))
EOF
  ); then pass eval_cuda_bf16 "$message"; else fail eval_cuda_bf16 "$(echo "$message" | tail -1)"; fi
else
  fail eval_cuda_bf16 "an eval run failed: $(tail -2 "$WORK"/eval-*.log | tr '\n' ' ' | tail -c 400)"
fi

# ---- merge with mergekit's --cuda against the CPU merge ---------------------------------------------------
if limited 120 "$WORK/merge-cpu.log" "$BIN/mergekit-yaml" "$WORK/merge.yml" "$WORK/merged-cpu" \
   && limited 120 "$WORK/merge-cuda.log" "$BIN/mergekit-yaml" "$WORK/merge.yml" "$WORK/merged-cuda" --cuda; then
  if message=$("$PYTHON" - "$WORK/merged-cpu" "$WORK/merged-cuda" <<'EOF' 2>&1
import os, sys
from check_weights import weights  # written into $WORK above
cpu, cuda = weights(sys.argv[1]), weights(sys.argv[2])
assert cpu.keys() == cuda.keys(), "different tensors"
diff = max((cpu[n].float() - cuda[n].float()).abs().max().item() for n in cpu)
assert diff <= 1e-6, f"max |cpu - cuda| = {diff:.3g}"
assert os.path.isfile(os.path.join(sys.argv[2], "diagnostics.json")), "no diagnostics.json in the --cuda output"
print(f"{len(cpu)} tensors, max |cpu - cuda| {diff:.3g}, diagnostics written")
EOF
  ); then pass merge_cuda "$message"; else fail merge_cuda "$(echo "$message" | tail -1)"; fi
else
  fail merge_cuda "a merge failed: $(tail -3 "$WORK"/merge-cu*.log | tr '\n' ' ' | tail -c 400)"
fi

echo "elapsed $(( SECONDS - START )) s of ${BUDGET} s"
exit $FAILED
