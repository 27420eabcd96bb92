#!/usr/bin/env bash
# GPU check, one script, under 8 minutes on one H100 (16 CPU cores; step limits 120+150+200 s):
#   tests  the CUDA tests (pytest -m gpu tests/test_gpu.py; none may skip)
#   bench  fetalplanes bench --device cuda --json OUT/bench_cuda.json
#   fpdb   the fpdb6-lite0 recipe on an FPDB-sized synthetic set (12,384 images at 800 x 540,
#          ~1,770 patients, generated here in parallel) for a few epochs
# then one summary table (measured beside the targets) in OUT/summary.txt.
#
# Usage: bash scripts/gpu_check.sh [tests] [bench] [fpdb]        (default: all three)
# Outputs go to $OUT when set (the device runner collects it), else a new temp folder;
# generated images, caches and runs go to a scratch folder that is deleted at the end.
# Exit status: non-zero when a step fails (targets missed are reported, not failures).
# Knobs (fpdb step): GPU_CHECK_DEVICE=cuda|cpu, GPU_CHECK_SCALE=1.0 (share of the FPDB-sized
# set), GPU_CHECK_EPOCHS=3, GPU_CHECK_WORKERS (decode/generate processes, default all cores).
# The CPU figures of docs/results.md came from:
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_SCALE=0.05 GPU_CHECK_EPOCHS=1 bash scripts/gpu_check.sh fpdb
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-$(mktemp -d -t fetalplanes-gpu-check.XXXXXX)}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
SCRATCH="$(mktemp -d -t fetalplanes-gpu-scratch.XXXXXX)"
trap 'rm -rf "$SCRATCH"' EXIT
STEPS="${*:-tests bench fpdb}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
export GPU_CHECK_SCALE="${GPU_CHECK_SCALE:-1.0}" GPU_CHECK_EPOCHS="${GPU_CHECK_EPOCHS:-3}"
export GPU_CHECK_WORKERS="${GPU_CHECK_WORKERS:-$(nproc)}" GPU_CHECK_DEVICE="$DEVICE"
export FETALPLANES_CACHE="$SCRATCH/cache" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
for s in $STEPS; do
  case "$s" in tests|bench|fpdb) ;; *) echo "gpu_check: unknown step '$s' (tests, bench, fpdb)" >&2; exit 2;; esac
done

# The same environment as scripts/test.sh: .venv, pinned torch, fetalplanes[dev].
if [ ! -x .venv/bin/python ]; then
  PY=${PYTHON:-python3}
  "$PY" -c 'import sys; assert sys.version_info >= (3, 10), "fetalplanes needs Python >= 3.10"'
  "$PY" -m venv .venv
  . .venv/bin/activate
  export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
  echo "gpu_check: installing fetalplanes[dev] into .venv (pip)"
  python -m pip install -q -c scripts/constraints.txt -e ".[dev]" || exit 1
else
  . .venv/bin/activate
fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "steps: $STEPS; fpdb device $DEVICE, scale $GPU_CHECK_SCALE, epochs $GPU_CHECK_EPOCHS"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores"
  echo "load: $(cat /proc/loadavg)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader | sed 's/^/gpu: /'
  python -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
                                 f"available {torch.cuda.is_available()}")'
} | tee "$OUT_DIR/machine.txt"

needs_cuda=0
case " $STEPS " in *" tests "*|*" bench "*) needs_cuda=1;; esac
[ "$DEVICE" = cuda ] && case " $STEPS " in *" fpdb "*) needs_cuda=1;; esac
if [ "$needs_cuda" = 1 ] && ! python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "gpu_check: no CUDA GPU visible to torch; nothing to check here" >&2
  exit 1
fi

FAILED=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, remember a failure
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name (limit ${limit}s)"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  rc=${PIPESTATUS[0]}
  echo "$name rc=$rc seconds=$(( $(date +%s) - start ))" | tee -a "$OUT_DIR/steps.txt"
  [ "$rc" = 0 ] || FAILED+=("$name")
}

case " $STEPS " in *" tests "*)
  step tests 120 python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -rs \
    --junitxml="$OUT_DIR/gpu_tests.xml";;
esac
case " $STEPS " in *" bench "*)
  step bench 150 fetalplanes bench --device cuda --json "$OUT_DIR/bench_cuda.json" --quiet;;
esac

cat > "$SCRATCH/fpdb_sized.py" <<'PY'
"""The fpdb6-lite0 recipe on an FPDB-sized synthetic set: generation, decode, epochs,
in-memory inference, peak memory. Writes fpdb_sized.json into the folder given."""

import json
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

FULL_PER_CLASS = 2064  # x 6 planes = 12,384 images, the size of FETAL_PLANES_DB (12,400)


def shard(args):
    from fetalplanes.data.datasets import PLANES
    from fetalplanes.data.synth import generate

    out, k, per_class = args
    t0 = time.perf_counter()
    s = generate(out, per_class=per_class, fmt="fpdb", seed=1000 + k, planes=PLANES,
                 size=(540, 800), images_per_patient=(2, 5), train_fraction=0.575,
                 progress=False)
    return s.n_images, time.perf_counter() - t0


def make_data(root, per_class, workers):
    """Shards generated in parallel, merged into one FETAL_PLANES_DB layout (patient
    numbers offset per shard so no two shards share a patient)."""
    shards = max(1, min(workers, per_class))
    sizes = [per_class // shards + (i < per_class % shards) for i in range(shards)]
    jobs = [(root / f"shard{k:02d}", k, n) for k, n in enumerate(sizes)]
    with ProcessPoolExecutor(workers) as pool:
        done = list(pool.map(shard, jobs))
    data = root / "fpdb"
    (data / "Images").mkdir(parents=True)
    lines = None
    for k, (folder, _, _) in enumerate(jobs):
        text = (folder / "FETAL_PLANES_DB_data.csv").read_text().splitlines()
        lines = lines or [text[0]]
        for row in text[1:]:
            cells = row.split(";")
            name = f"S{k:02d}_{cells[0]}"
            (folder / "Images" / f"{cells[0]}.png").rename(data / "Images" / f"{name}.png")
            lines.append(";".join([name, str(k * 100_000 + int(cells[1])), *cells[2:]]))
    (data / "FETAL_PLANES_DB_data.csv").write_text("\n".join(lines) + "\n")
    n = sum(d[0] for d in done)
    return data, n, sum(d[1] for d in done) / n


def peak_mb():
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, kids


def timed_train_epochs(seconds):
    """Time the training pass of each epoch on its own (the epoch row also holds the
    validation pass), by wrapping the function Trainer.epoch calls."""
    import fetalplanes.engine.train as engine_train

    inner = engine_train.train_epoch

    def wrapper(loop, *args, **kwargs):
        t0 = time.perf_counter()
        result = inner(loop, *args, **kwargs)
        if loop.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        return result

    engine_train.train_epoch = wrapper


def main():
    import torch

    from fetalplanes.engine.train import Trainer, TrainConfig, predict_logits
    from fetalplanes.recipes import read_config

    out, scratch = Path(sys.argv[1]), Path(sys.argv[2])
    device = os.environ["GPU_CHECK_DEVICE"]
    workers = int(os.environ["GPU_CHECK_WORKERS"])
    per_class = max(4, round(FULL_PER_CLASS * float(os.environ["GPU_CHECK_SCALE"])))
    epochs = int(os.environ["GPU_CHECK_EPOCHS"])
    t0 = time.perf_counter()
    data, n_images, s_per_img = make_data(scratch, per_class, workers)
    gen_s = time.perf_counter() - t0
    print(f"generated {n_images} images in {gen_s:.1f} s with {workers} processes "
          f"({1000 * s_per_img:.1f} ms/image on one core)", flush=True)
    values, recipe = read_config("fpdb6-lite0")
    cfg = TrainConfig.from_dict(values).updated(
        epochs=epochs, early_stopping=0, device=device, workers=workers, cache=False)
    t0 = time.perf_counter()
    trainer = Trainer(data, preset=recipe.preset, config=cfg, out=scratch / "run",
                      progress=False).setup()
    setup_s = time.perf_counter() - t0
    train_s = []
    timed_train_epochs(train_s)
    rows = [trainer.epoch() for _ in range(epochs)]
    own, kids = peak_mb()  # before inference: its large batches are not training's peak
    cuda = trainer.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    batch = 512 if cuda else 64
    predict_logits(trainer.loop, trainer.val_data, batch_size=batch)  # warm-up
    sync()
    t0 = time.perf_counter()
    predict_logits(trainer.loop, trainer.train_data, batch_size=batch)
    sync()
    infer = len(trainer.train_data) / (time.perf_counter() - t0)
    trainer.finish()
    n_train, n_val = len(trainer.train_data), len(trainer.val_data)
    train_img_s = [round(n_train / t, 1) for t in train_s]
    scale = float(os.environ["GPU_CHECK_SCALE"])
    arrays_mb = (trainer.train_data.x.nelement() + trainer.val_data.x.nelement()) / 2**20
    report = {
        "device": str(trainer.device),
        "n_images": n_images,
        "n_patients": len(trainer.data.patients),
        "train_images_per_epoch": len(trainer.train_data),
        "val_images": len(trainer.val_data),
        "generate_seconds": round(gen_s, 1),
        "generate_ms_per_image_one_core": round(1000 * s_per_img, 1),
        "workers": workers,
        "setup_seconds": round(setup_s, 1),
        "epochs": rows,
        "epoch_seconds": [r["seconds"] for r in rows],
        "train_pass_seconds": [round(t, 2) for t in train_s],
        "train_img_s": train_img_s,
        "inference_img_s": round(infer, 1),
        "inference_batch": batch,
        "scale": scale,
        "full_size_epoch_seconds_estimate": round(
            (n_train / scale) / train_img_s[-1] + (n_val / scale) / infer, 1),
        "arrays_mb": round(arrays_mb, 1),
        "full_size_arrays_mb": round(arrays_mb / scale, 1),
        "peak_rss_training_mb": round(own, 1),
        "peak_rss_children_mb": round(kids, 1),
        "gpu_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if trainer.device.type == "cuda" else None,
        "config": cfg.to_dict(),
    }
    (out / "fpdb_sized.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("epochs", "config")}))


if __name__ == "__main__":
    main()
PY

case " $STEPS " in *" fpdb "*)
  step fpdb 200 python "$SCRATCH/fpdb_sized.py" "$OUT_DIR" "$SCRATCH";;
esac

python - "$OUT_DIR" "$DEVICE" <<'PY' | tee "$OUT_DIR/summary.txt"
"""One table: measured beside the targets, from the files the steps wrote."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, device = Path(sys.argv[1]), sys.argv[2]
rows = []


def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.is_file() else None


xml = out / "gpu_tests.xml"
if xml.is_file():
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    a = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    ok = a["tests"] - a["failures"] - a["errors"] - a["skipped"]
    rows.append(("CUDA tests passed", f"{ok}/{a['tests']}", f"{a['tests']}/{a['tests']}",
                 ok == a["tests"] > 0))
bench = load("bench_cuda.json")
if bench:
    res = bench.get("results", {})
    for key, target in (("train_cache_img_s", 4000), ("model_torch_img_s", 15000)):
        if key in res:
            rows.append((f"bench {key}", f"{res[key]:,.0f}", f">= {target:,}",
                         res[key] >= target))
fp = load("fpdb_sized.json")
if fp:
    last = fp["epoch_seconds"][-1]
    rows += [
        (f"fpdb6-lite0 train img/s, augmented (last epoch, {fp['device']})",
         f"{fp['train_img_s'][-1]:,.0f}", ">= 4,000", fp["train_img_s"][-1] >= 4000),
        ("fpdb6-lite0 inference img/s (in memory)", f"{fp['inference_img_s']:,.0f}",
         ">= 15,000", fp["inference_img_s"] >= 15000),
        (f"epoch seconds, train + validation ({fp['train_images_per_epoch']:,} train images)",
         ", ".join(f"{s:.1f}" for s in fp["epoch_seconds"]), "< 5", last < 5),
        ("decode (setup) seconds", f"{fp['setup_seconds']:.1f}", "-", None),
        (f"generate {fp['n_images']:,} images, seconds",
         f"{fp['generate_seconds']:.1f} ({fp['generate_ms_per_image_one_core']} ms/img/core)",
         "-", None),
        ("peak RSS MB while training (main / worker)", f"{fp['peak_rss_training_mb']:,.0f} / "
         f"{fp['peak_rss_children_mb']:,.0f}", "-", None),
    ]
    if fp["scale"] != 1:
        rows.append((f"FPDB-sized epoch seconds, extrapolated from scale {fp['scale']}",
                     f"{fp['full_size_epoch_seconds_estimate']:,.0f}", "< 5",
                     fp["full_size_epoch_seconds_estimate"] < 5))
    if fp.get("gpu_peak_mb") is not None:
        rows.append(("peak GPU memory MB", f"{fp['gpu_peak_mb']:,.0f}", "-", None))
steps = (out / "steps.txt").read_text().splitlines() if (out / "steps.txt").is_file() else []
width = max([len(r[0]) for r in rows] + [10])
print(f"\n{'measure':{width}}  {'measured':>24}  {'target':>10}  verdict")
for name, value, target, ok in rows:
    verdict = "-" if ok is None else ("meets" if ok else "BELOW TARGET")
    print(f"{name:{width}}  {value:>24}  {target:>10}  {verdict}")
print("\nsteps: " + "; ".join(steps))
PY

if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu_check: FAILED steps: ${FAILED[*]} (logs in $OUT_DIR)" >&2
  exit 1
fi
echo "gpu_check: all steps passed (outputs in $OUT_DIR)"
