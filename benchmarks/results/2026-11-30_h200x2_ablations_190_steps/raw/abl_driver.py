"""Device-side driver for issue 17's ablations within 600 s device calls (README "Ablations of the components").

Round 1: the default and every ablation at AT steps (the budget's), seed 0 on GPU 0 and seed 1 on GPU 1 (as
proxy_speedrun.py pins them). GPU 0 takes the arms in order, GPU 1 in reverse after the default, so each new
graph is compiled once (cold) and its other seed finds it in the host's compile cache. With --wait_cold GPU 1
starts only once GPU 0's first run has logged its start-up: a lone cold start on a fresh host.
Round 2 (once round 1's logs of both seeds are in): `ablations.py equal_time --at AT`; the ablations it plans at
another count run again as NAME_eqAT_sS; those at equal time already are left out (ablations.py says so).

State lives in /tmp/abl (kept while the machine stays warm) and is seeded from .device_data/abl_logs (the logs of
earlier calls, fetched), so a later call picks up where the last stopped; a job starts only if its estimate fits
the call's --budget.
usage: python .device_data/abl_driver.py [--budget 580] [--wait_cold] [--only a,b] [--extra TAG=FLAGS ...]
"""
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
AT = int(os.environ.get("ABL_AT", 190))
TRAIN = os.environ.get("ABL_TRAIN", f"{D}/proxy_train_*.bin")  # ABL_*: a CPU dry run with the tiny preset
VAL = os.environ.get("ABL_VAL", f"{D}/proxy_val_*.bin")
PREFIX = os.environ.get("ABL_PREFIX", "").split()
COLD_EST, WARM_EST = int(os.environ.get("ABL_COLD_EST", 240)), int(os.environ.get("ABL_WARM_EST", 165))
p = argparse.ArgumentParser()
p.add_argument("--budget", type=int, default=580)
p.add_argument("--wait_cold", action="store_true")
p.add_argument("--only", default="", help="comma-separated ablations (default: all)")
p.add_argument("--no_round2", action="store_true")
p.add_argument("--extra", action="append", default=[], help="TAG_sS=FLAGS, run on GPU S after everything else")
p.add_argument("--first", action="append", default=[],
               help="TAG_sS=FLAGS, run on GPU S before round 1 (GPU 1: after --wait_cold); FLAGS may hold "
                    "--trainer=PATH (another trainer file); a TAG starting with cmd runs FLAGS as a shell command")
args = p.parse_args()
NAMES = ablations.chosen(args.only)
LOGS.mkdir(parents=True, exist_ok=True)
OUTS.mkdir(parents=True, exist_ok=True)
for f in (ROOT / ".device_data" / "abl_logs").glob("*.txt"):
    if not (LOGS / f.name).exists():
        shutil.copy(f, LOGS / f.name)
if "ABL_TRAIN" not in os.environ:
    subprocess.run(["sh", str(ROOT / ".device_data/corpus/unpack.sh"), D], check=True, stdout=subprocess.DEVNULL)
out_dir = Path(os.environ.get("OUT", "/tmp/out"))
out_dir.mkdir(parents=True, exist_ok=True)
say_lock, plan_lock = threading.Lock(), threading.Lock()
events = open(W / "queue.txt", "a")


def say(msg):
    line = f"[{time.time() - T0:6.0f}s] {msg}"
    with say_lock:
        print(line, flush=True)
        events.write(line + "\n")
        events.flush()


def finished(tag):
    f = LOGS / f"{tag}.txt"
    return f.exists() and "\npeak memory allocated:" in f.read_text()


WARM = W / "warm.txt"  # flag sets whose graphs this host compiled (/tmp/abl lives exactly as long as the cache)
warm = set(WARM.read_text().splitlines()) if WARM.exists() else set()


def mark_warm(key):
    with say_lock:
        if key not in warm:
            warm.add(key)
            WARM.write_text("\n".join(sorted(warm)) + "\n")


def round1(seed):
    arms = [(name, list(ablations.ABLATIONS[name][1])) for name in NAMES]
    order = arms if seed == 0 else arms[::-1]
    return [(f"{name}_s{seed}", [f"--num_iterations={AT}", *flags])
            for name, flags in [("default", []), *order]]


plan = {"jobs": None}


def round2(seed):
    with plan_lock:
        if plan["jobs"] is None:
            logs = [str(LOGS / f"{tag}.txt") for s in (0, 1) for tag, _ in round1(s) if finished(tag)]
            r = subprocess.run([sys.executable, str(ROOT / "benchmarks/ablations.py"), "equal_time", "--at", str(AT),
                                "--only", ",".join(NAMES), "--logs", *logs], capture_output=True, text=True)
            say("plan:\n" + r.stdout + r.stderr)
            skip = set(re.findall(r"^(\w+): round 1's runs are at equal time already", r.stdout, re.M))
            plan["jobs"] = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+): --num_iterations=(\d+)", r.stdout, re.M)
                            if m[1] not in skip}
    return [(f"{name}_eq{AT}_s{seed}", [*ablations.ABLATIONS[name][1], f"--num_iterations={steps}"])
            for name, steps in plan["jobs"].items()]


def extras(seed, specs=None):
    jobs = []
    for spec in args.extra if specs is None else specs:
        tag, _, flags = spec.partition("=")
        if tag.endswith(f"_s{seed}"):
            jobs.append((tag, flags.split()))
    return jobs


def flags_key(flags):
    return " ".join(f for f in flags if not f.startswith("--num_iterations"))


def run(gpu, tag, flags):
    seed = re.search(r"_s(\d+)$", tag)[1]
    say(f"gpu{gpu} START {tag} {' '.join(flags)}")
    trainer = next((f.partition("=")[2] for f in flags if f.startswith("--trainer=")), str(ROOT / "train_gpt.py"))
    flags = [f for f in flags if not f.startswith("--trainer=")]
    cmd = [sys.executable, trainer, *PREFIX, f"--train_files={TRAIN}", f"--val_files={VAL}",
           "--cycle_train_data=true", "--target_val_loss=1.98", "--val_loss_every=0", f"--seed={seed}",
           f"--log_dir={LOGS}", f"--run_id={tag}", *flags]
    if tag.startswith("cmd"):
        cmd = ["bash", "-c", " ".join(flags)]
    (LOGS / f"{tag}.txt").unlink(missing_ok=True)
    with open(OUTS / f"{tag}.out", "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)})
        while proc.poll() is None:
            time.sleep(2)
            log = LOGS / f"{tag}.txt"
            if flags_key(flags) not in warm and log.exists() and "\nwarmup_and_compile_time:" in log.read_text():
                mark_warm(flags_key(flags))
            if time.time() - T0 > args.budget + 10:
                proc.kill()
        rc = proc.wait()
    if tag.startswith("cmd") and rc == 0:
        (OUTS / f"{tag}.done").touch()
    text = (LOGS / f"{tag}.txt").read_text() if (LOGS / f"{tag}.txt").exists() else ""
    summary = [ln for ln in text.splitlines() if ln.startswith("warmup_and_compile_time") or "val_loss:" in ln][-2:]
    say(f"gpu{gpu} END {tag} rc={rc} " + " | ".join(summary))


def worker(gpu):
    if gpu == 1 and args.wait_cold:
        log = LOGS / "default_s0.txt"
        while time.time() - T0 < 400 and not (log.exists() and "\nwarmup_and_compile_time:" in log.read_text()):
            time.sleep(2)
        say(f"gpu{gpu}: GPU 0's first start-up logged; starting")
    phases = [lambda: extras(gpu, args.first), lambda: round1(gpu), lambda: [] if args.no_round2 else round2(gpu),
              lambda: extras(gpu)]
    for phase in phases:
        if phase is phases[2] and not args.no_round2:
            # round 2 plans from both seeds' round 1: wait for the other GPU's round 1 (or the call's end)
            while not all(finished(t) for s in (0, 1) for t, _ in round1(s)) and time.time() - T0 < args.budget:
                time.sleep(3)
        for tag, flags in phase():
            if finished(tag) or (OUTS / f"{tag}.done").exists():
                continue
            est = WARM_EST if flags_key(flags) in warm else COLD_EST
            if time.time() - T0 + est > args.budget:
                say(f"gpu{gpu} SKIP {tag} (est {est} s)")
                continue
            run(gpu, tag, flags)
    say(f"gpu{gpu}: done")


threads = [threading.Thread(target=worker, args=(g,)) for g in (0, 1)]
for t in threads:
    t.start()
for t in threads:
    t.join()
with open(out_dir / "host.txt", "w") as host:
    subprocess.run(f"nvidia-smi --query-gpu=index,name,pci.bus_id,driver_version,clocks.max.sm,power.limit "
                   f"--format=csv; {sys.executable} -c 'import torch, triton; print(\"torch\", torch.__version__, "
                   "\"triton\", triton.__version__)'", shell=True, stdout=host, stderr=subprocess.STDOUT)
with tarfile.open(out_dir / "abl.tgz", "w:gz") as tar:
    tar.add(W, arcname="abl")
say("done")
