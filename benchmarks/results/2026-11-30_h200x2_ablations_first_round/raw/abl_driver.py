"""Device-side driver for issue 17's ablations within 600 s calls: a shared job list pulled by one worker per GPU,
round 1 (every arm at ROUND1 steps, one seed) then round 2 (equal time at AT steps, planned by ablations.py from
round 1's logs). State lives in /tmp/abl (kept while the machine stays warm) and is seeded from
.device_data/abl_logs (logs fetched from earlier calls), so a later call picks up where the last stopped.
usage: python .device_data/abl_driver.py [--budget 585] [--wait_cold] [--round2_seeds 0,1] [--extra JOB=FLAGS ...]"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

T0 = time.time()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import ablations  # noqa: E402

D = "/tmp/proxy"
W = Path(os.environ.get("ABL_DIR", "/tmp/abl"))
LOGS, OUTS = W / "logs", W / "outs"
ROUND1, AT = int(os.environ.get("ABL_ROUND1", 30)), int(os.environ.get("ABL_AT", 190))
TRAIN = os.environ.get("ABL_TRAIN", f"{D}/proxy_train_*.bin")  # ABL_*: a CPU dry run with the tiny preset
VAL = os.environ.get("ABL_VAL", f"{D}/proxy_val_*.bin")
PREFIX = os.environ.get("ABL_PREFIX", "").split()
p = argparse.ArgumentParser()
p.add_argument("--budget", type=int, default=585)
p.add_argument("--wait_cold", action="store_true", help="GPU 1 waits for GPU 0's first startup (a lone cold start)")
p.add_argument("--round2_seeds", default="0,1")
p.add_argument("--extra", action="append", default=[], help="TAG=FLAGS run after the plan (TAG ends _sN)")
args = p.parse_args()
LOGS.mkdir(parents=True, exist_ok=True)
OUTS.mkdir(parents=True, exist_ok=True)
for f in (ROOT / ".device_data" / "abl_logs").glob("*.txt"):
    if not (LOGS / f.name).exists():
        shutil.copy(f, LOGS / f.name)
if "ABL_TRAIN" not in os.environ:
    subprocess.run(["sh", str(ROOT / ".device_data/corpus/unpack.sh"), D], check=True, stdout=subprocess.DEVNULL)
out_dir = Path(os.environ.get("OUT", "/tmp/out"))
out_dir.mkdir(parents=True, exist_ok=True)
lock = threading.Lock()
events = open(W / "queue.txt", "a")


def say(msg):
    line = f"[{time.time() - T0:6.0f}s] {msg}"
    with lock:
        print(line, flush=True)
        events.write(line + "\n")
        events.flush()


def finished(tag):
    f = LOGS / f"{tag}.txt"
    return f.exists() and "\npeak memory allocated:" in f.read_text()


def round1_jobs():
    return [(f"{name}_s0", 190, [f"--num_iterations={ROUND1}", *flags])
            for name, flags in [("default", ()), *((n, abl[1]) for n, abl in ablations.ABLATIONS.items())]]


SEEDS = [int(s) for s in args.round2_seeds.split(",")]
# both round-2 defaults right after round 1 (they need no plan): every later ablation run has a default beside it
DEFAULTS2 = [(f"default_eq{AT}_s{seed}", 175, [f"--num_iterations={AT}"]) for seed in SEEDS]


def planned_jobs():
    logs = [str(LOGS / f"{tag}.txt") for tag, _, _ in round1_jobs() if finished(tag)]
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/ablations.py"), "equal_time", "--at", str(AT),
                        "--logs", *logs], capture_output=True, text=True)
    say("plan:\n" + r.stdout + r.stderr)
    steps = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+): --num_iterations=(\d+)", r.stdout, re.M)}
    jobs = [(f"{name}_eq{AT}_s{seed}", 175, [*flags, f"--num_iterations={steps[name]}"])
            for seed in SEEDS for name, (_, flags) in ablations.ABLATIONS.items() if name in steps]
    for spec in args.extra:
        tag, _, flags = spec.partition("=")
        jobs.append((tag, 200, flags.split()))
    return jobs


claimed, running = set(), set()
plan = None
plan_lock = threading.Lock()


def next_job():
    global plan
    with plan_lock:
        r1 = round1_jobs()
        if plan is None and all(finished(t) or (t in claimed and t not in running) for t, _, _ in r1):
            plan = planned_jobs()
        pending = [j for j in [*r1, *DEFAULTS2, *(plan or [])] if not finished(j[0]) and j[0] not in claimed]
        if not pending:
            return "wait" if plan is None else None
        now = time.time() - T0
        for tag, est, flags in pending:
            if now + est <= args.budget:
                claimed.add(tag)
                running.add(tag)
                return tag, est, flags
        return None


def worker(gpu):
    if gpu == 1 and args.wait_cold:
        log = LOGS / "default_s0.txt"
        while time.time() - T0 < 300 and not (log.exists() and "\nwarmup_and_compile_time:" in log.read_text()):
            time.sleep(2)
        say(f"gpu{gpu}: GPU 0's cold start logged; starting")
    while True:
        job = next_job()
        if job == "wait":
            time.sleep(3)
            continue
        if job is None:
            say(f"gpu{gpu}: nothing left that fits")
            return
        tag, est, flags = job
        seed = re.search(r"_s(\d+)$", tag)[1]
        left = args.budget + 10 - (time.time() - T0)
        say(f"gpu{gpu} START {tag} {' '.join(flags)}")
        cmd = [sys.executable, str(ROOT / "train_gpt.py"), *PREFIX, f"--train_files={TRAIN}", f"--val_files={VAL}", "--cycle_train_data=true", "--target_val_loss=1.98",
               "--val_loss_every=0", f"--seed={seed}", f"--log_dir={LOGS}", f"--run_id={tag}", *flags]
        (LOGS / f"{tag}.txt").unlink(missing_ok=True)
        with open(OUTS / f"{tag}.out", "w") as out:
            try:
                rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=max(1, left),
                                    env={**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        text = (LOGS / f"{tag}.txt").read_text() if (LOGS / f"{tag}.txt").exists() else ""
        summary = [ln for ln in text.splitlines() if "val_loss" in ln or "startup_time" in ln][-2:]
        with plan_lock:
            running.discard(tag)
        say(f"gpu{gpu} END {tag} rc={rc} " + " | ".join(summary))


threads = [threading.Thread(target=worker, args=(g,)) for g in (0, 1)]
for t in threads:
    t.start()
for t in threads:
    t.join()
with open(out_dir / "host.txt", "w") as host:
    subprocess.run(f"nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; {sys.executable} -c "
                   "'import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__)'",
                   shell=True, stdout=host, stderr=subprocess.STDOUT)
with tarfile.open(out_dir / "abl.tgz", "w:gz") as tar:
    tar.add(W, arcname="abl")
say("done")
