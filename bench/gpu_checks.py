"""Every GPU check of the project in one device call of at most 330 s (issue 18), and its CPU twin.

    bash bench/gpu_checks.sh                          # a lent H100 / H200, repo root, .whl/ carried: the whole check
    bash bench/gpu_checks.sh --cpu                    # the CPU twin: the same checks at CPU shapes, 300 s deadline
    bash bench/gpu_checks.sh right_reference paper    # rerun only these (a part name, e.g. `right`, selects its rows)
    python3 bench/gpu_checks.py --list                # the table: name, part, budgets, command

The plan is the table CHECKS below, in the issue's order (env, runs, right, fast, paper: most important first).
Each row is one check: a command run as a child process (its own process group), a budget in seconds for the GPU
and one for the CPU twin. The GPU budgets add up to at most TOTAL_S["gpu"] - MARGIN_S (tests/test_gpu_checks.py),
so the call ends by 330 s, wheel install included (the `install` row).

Deadline: t0 is the start of gpu_checks.sh; the deadline is t0 + TOTAL_S - MARGIN_S (the margin pays for killing a
child, the summary and bash). Before a check starts, `left` = deadline - now. A check whose budget exceeds `left`
is not started: it prints a JSON line with status "skipped" and reason "time: ...". Otherwise its timeout is the
larger of OVERRUN (2) x its budget and its budget plus whatever earlier checks saved (`left` minus the budgets of
the selected checks after it), never more than `left`. So when every check keeps to its budget, all of them run;
one that needs up to twice its budget (a first estimate that was low) still finishes, at the cost of the last
checks, which the order makes the least important: they are skipped for time, each with its line. A check that
runs past its timeout is killed (SIGTERM to its process group, SIGKILL 3 s later): status "timeout". One that
exits non-zero: status "failed". Both carry the tail of their output, and the next check starts.

Output, the moment each check ends (so a call cut short still brings back what finished): one JSON line on stdout
(and nothing else on stdout; progress goes to stderr), the same line in $OUT/<name>.json and appended to
$OUT/checks.jsonl, and the child's whole output in $OUT/<name>.log ($OUT, else gpu_out/). A JSON line:
  check, part, mode ("gpu" | "cpu"), status ("ok" | "failed" | "timeout" | "skipped" | "interrupted"),
  seconds (wall), budget_s, timeout_s, cmd, results (every JSON object the child printed on a line of its own,
  in order: each bench's own record), tail (last 2000 characters of output; failed / timeout / interrupted only),
  reason and skip (skipped only; skip is "time", "needs": a check it reads did not pass, or "n/a": nothing to do
  here, e.g. no wheels to install or the CPU twin of a GPU-only row; "n/a" does not count as a failure).
The last line is the summary: check "summary", the status of every selected check, the rerun command for the ones
that did not pass, and the issue's targets read from fast_step and fast_anchor (KD step >= 40k tokens/s,
MFU >= 0.45, peak <= 32 GiB, KD / LM-only <= 1.12x on the same engine; anchor ratios beside them).

Adding a check (issues 19 and 22 add theirs this way): one Check row in CHECKS, in its part's place, with a
command that ends by printing one JSON line, a GPU budget (measured, or a stated guess) and a CPU budget; take the
seconds from another row of the same part if the GPU total would pass 325 s. Nothing else changes.
Placeholders in commands: {py} the interpreter, {dev} "--gpu" or "" (CPU), {work} the scratch directory (data,
runs), {out} the output folder, {peak} the env check's measured matmul peak in TFLOP/s (0 if it did not run),
{anchor} the anchor script, {wheels} the carried wheels.
"""
import argparse
import dataclasses
import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from distillery.errors import ConfigError, cli  # noqa: E402  (stdlib-only modules: this runs before the wheels)

PARTS = ("env", "runs", "right", "fast", "paper")   # the order, most important first
TOTAL_S = {"gpu": 330, "cpu": 300}                  # the call's wall-clock limit, wheel install included
MARGIN_S = 5                                        # killing a timed-out child, the summary line, bash
OVERRUN = 2                                         # a check may run to OVERRUN x its budget, at later checks' cost
SITE = "/tmp/site"                                  # where the carried wheels go on the device (its image is bare)
TAIL = 2000


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    part: str                   # one of PARTS
    gpu_s: int                  # budget on the GPU, seconds
    cpu_s: int | None           # budget of the CPU twin; None: GPU only
    cmd: str                    # command template (placeholders: module docstring)
    gpu: str = ""               # extra arguments on the GPU
    cpu: str = ""               # extra arguments on CPU
    needs: tuple = ()           # earlier checks this one reads the output of (added to a rerun's selection)
    requires: str = ""          # "wheels": only with .whl/ here; "anchor": only with the anchor script here


# GPU budgets are first estimates, not measurements (no GPU has run this table yet): a process importing torch,
# DeepSpeed and transformers, ~5 s; three of them per launcher run; compiling flex attention on first use; 10-13
# timed steps at ~0.1-1 s. The CPU budgets share 295 s by what each check cost on the 2-core dev box, where the whole
# twin uses ~2 min of CPU; under a heavy load the last ones are skipped for time (docs/benchmarks.md).
CHECKS = (
    # 1. environment
    Check("install", "env", 18, None, "{py} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "
          "--upgrade --target " + SITE + " {wheels}", requires="wheels"),
    Check("env", "env", 12, 15, "{py} bench/env_check.py {dev}"),
    # 2. it runs: train.py under the deepspeed launcher, ZeRO-3 student + ZeRO-3 inference teacher
    Check("data", "runs", 10, 20, "{py} bench/trainer_runs.py data --work {work} {dev}"),
    Check("runs_live", "runs", 28, 40, "{py} bench/trainer_runs.py live --work {work} {dev}", needs=("data",)),
    Check("runs_offload", "runs", 20, 30, "{py} bench/trainer_runs.py offload --work {work} {dev}", needs=("data",)),
    Check("runs_resume", "runs", 20, 30, "{py} bench/trainer_runs.py resume --work {work} {dev}",
          needs=("data", "runs_live")),
    # 3. it is right
    Check("right_reference", "right", 35, 35, "{py} bench/reference_loop.py --data {work}/data {dev}",
          cpu="--student micro --teacher micro --steps 12 --micro_batch 4 --global_batch 8", needs=("data",)),
    # the start-of-run probe (distillery/maskprobe.py) on every kernel installed, at micro-batch 1, 2, 4: one-layer
    # copies of the study's pair and a Qwen3 in bf16 on the GPU (flash-attn 2/3 if installed, compiled flex, sdpa,
    # eager), the CPU presets in fp32 on CPU; exit 1 if a kernel lets a packed document see its neighbours
    Check("right_doc_mask", "right", 25, 15, "{py} -m distillery.maskprobe",
          gpu="--presets llama3-1.7b llama3-0.7b qwen3-0.6b",
          cpu="--presets micro micro-qwen3 tiny-student --kernels auto sdpa eager"),
    Check("right_fused_head", "right", 15, 20, "{py} bench/kd_loss.py --variants plain,fused",
          gpu="--gpu --reps 3 --max-rel-err 4e-2",
          cpu="--cpu --vocab 8192 --tokens 1024 --hidden 256 --reps 1 --max-rel-err 1e-5"),
    # 4. it is fast
    Check("fast_anchor", "fast", 42, 15, "{py} {anchor} lm_only liger_kd", requires="anchor"),
    # the KD step and the LM-only step of the same engine (the 1.12x target), and the teacher replicated and
    # offloaded instead of partitioned (issue 22: the placement's step time at the anchor's shapes)
    Check("fast_step", "fast", 55, 45, "{py} bench/train_step.py {dev} --variants distillery_lm,distillery,"
          "distillery_replicated,distillery_offload --peak_tflops {peak}"),
    # 5. the study's pair
    Check("paper", "paper", 45, 30, "{py} bench/train_step.py {dev} --paper --variants distillery_doc_mask "
          "--peak_tflops {peak}"),
)


def budget(c, mode):
    return c.gpu_s if mode == "gpu" else c.cpu_s


def select(names, checks=CHECKS):
    """The rows to run, in table order: every row when names is empty; else the named rows and parts, plus what they
    need and the env rows (install, env: the device, the versions and the matmul peak every other line is read
    against)."""
    if not names:
        return list(checks)
    by_name = {c.name: c for c in checks}
    want = set()
    for n in names:
        if n in by_name:
            want.add(n)
        elif n in PARTS:
            want |= {c.name for c in checks if c.part == n}
        else:
            raise ConfigError(f"unknown check {n!r}; checks: {', '.join(by_name)}; parts: {', '.join(PARTS)}")
    want |= {c.name for c in checks if c.part == "env"}
    todo = list(want)
    while todo:
        for d in by_name[todo.pop()].needs:
            if d not in want:
                want.add(d)
                todo.append(d)
    return [c for c in checks if c.name in want]


def find_anchor(given):
    """The anchor script (../shared/bench/gpu_anchor.py next to a worktree, or shared/ inside the device's copy)."""
    for p in ([given] if given else []) + [os.path.join(REPO, "..", "shared", "bench", "gpu_anchor.py"),
                                             os.path.join(REPO, "shared", "bench", "gpu_anchor.py")]:
        if os.path.isfile(p):
            return os.path.abspath(p)
    return None


class Runner:
    """Runs the selected checks under one deadline, writing each check's line the moment it ends."""

    def __init__(self, checks, mode, out, t0, total_s, fields, env):
        self.checks, self.mode, self.out, self.env = checks, mode, out, env
        self.t0, self.deadline = t0, t0 + total_s - MARGIN_S
        self.fields = dict(fields)
        self.records = {}
        self.child = None
        os.makedirs(out, exist_ok=True)

    def emit(self, rec):
        line = json.dumps(rec)
        print(line, flush=True)
        with open(os.path.join(self.out, "checks.jsonl"), "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        if rec["check"] != "summary":
            from distillery.atomic import write_text
            write_text(os.path.join(self.out, f"{rec['check']}.json"), line + "\n")
            self.records[rec["check"]] = rec

    def skip_reason(self, c):
        """(why, kind) when c cannot run whatever the time: kind "n/a" (nothing to do here: not counted as a
        failure) or "needs" (a check it reads did not pass); None when it can."""
        if budget(c, self.mode) is None:
            return f"{self.mode}: this check runs on the GPU only", "n/a"
        if c.requires == "wheels" and not self.fields.get("wheels"):
            return "no .whl/*.whl here: nothing to install (fill it with bash ../shared/device/wheels.sh)", "n/a"
        if c.requires == "anchor" and not self.fields.get("anchor"):
            return ("no anchor script (../shared/bench/gpu_anchor.py or shared/bench/gpu_anchor.py; --anchor PATH)",
                    "n/a")
        bad = [d for d in c.needs if self.records.get(d, {}).get("status") not in (None, "ok")]
        if bad:
            return f"needs {', '.join(bad)}, which did not pass", "needs"
        return None

    def run(self):
        previous = signal.signal(signal.SIGTERM, self.interrupted)
        try:
            return self._run()
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _run(self):
        for i, c in enumerate(self.checks):
            base = dict(check=c.name, part=c.part, mode=self.mode, budget_s=budget(c, self.mode))
            skip = self.skip_reason(c)
            left = self.deadline - time.time()
            if skip is None and base["budget_s"] > left:
                skip = f"time: its budget is {base['budget_s']} s and {max(0.0, left):.0f} s are left", "time"
            if skip:
                self.emit(dict(base, status="skipped", reason=skip[0], skip=skip[1]))
                continue
            later = sum(budget(d, self.mode) or 0 for d in self.checks[i + 1:] if self.skip_reason(d) is None)
            # (a later check that turns out to need a failed one frees its time for the ones after it)
            timeout = min(left, max(OVERRUN * base["budget_s"], left - later))
            self.emit(self.run_one(c, base, timeout))
        return self.summary()

    def command(self, c):
        extra = c.gpu if self.mode == "gpu" else c.cpu
        return shlex.split(c.cmd.format(**self.fields)) + shlex.split(extra)

    def run_one(self, c, base, timeout):
        argv = self.command(c)
        log = os.path.join(self.out, f"{c.name}.log")
        print(f"[gpu_checks] {c.name}: {shlex.join(argv)} (timeout {timeout:.0f} s)", file=sys.stderr, flush=True)
        t = time.time()
        status = "ok"
        with open(log, "w") as f:
            self.child = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                rc = self.child.wait(timeout=timeout)
                status = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                self.kill()
                status, rc = "timeout", None
            self.child = None
        rec = dict(base, status=status, seconds=round(time.time() - t, 1), timeout_s=round(timeout, 1),
                   cmd=shlex.join(argv), rc=rc, results=json_lines(log))
        if status != "ok":
            rec["tail"] = tail(log)
        if c.name == "env" and status == "ok":  # the MFU denominator of every later check
            peak = next((r["matmul_peak_tflops"] for r in rec["results"] if "matmul_peak_tflops" in r), 0)
            self.fields["peak"] = peak
        if c.name == "install" and status == "ok":
            print(f"[gpu_checks] wheels installed into {SITE}", file=sys.stderr, flush=True)
        return rec

    def kill(self):
        """SIGTERM to the child's process group (the launcher's ranks too), SIGKILL after 3 s."""
        p = self.child
        for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 2)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                return
            try:
                p.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def interrupted(self, signum, frame):
        """The device call itself ran out: stop the running check, record it, and leave with the summary."""
        running = self.child
        if running is not None:
            self.kill()
            name = next((c for c in self.checks if c.name not in self.records), None)
            if name is not None:
                log = os.path.join(self.out, f"{name.name}.log")
                self.emit(dict(check=name.name, part=name.part, mode=self.mode, status="interrupted",
                               budget_s=budget(name, self.mode), results=json_lines(log), tail=tail(log)))
        self.summary()
        sys.exit(128 + signum)

    def summary(self):
        """The last line: every selected check's status, the rerun command for those that did not pass (skips with
        nothing to do here do not count), and the targets."""
        st = {c.name: self.records.get(c.name, {}).get("status", "not reached") for c in self.checks}
        redo = [n for n, s in st.items() if s != "ok" and self.records.get(n, {}).get("skip") != "n/a"]
        rec = dict(check="summary", mode=self.mode, seconds=round(time.time() - self.t0, 1),
                   deadline_s=round(self.deadline - self.t0, 1), statuses=st, all_ok=not redo,
                   rerun=("bash bench/gpu_checks.sh " + ("--cpu " if self.mode == "cpu" else "") + " ".join(redo))
                   if redo else None,
                   targets=targets(self.records))
        self.emit(rec)
        return rec


def json_lines(path):
    """Every JSON object the child printed on a line of its own, in order."""
    out = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                line = line.strip()
                if line.startswith("{") and line.endswith("}"):
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(obj, dict):
                        out.append(obj)
    except FileNotFoundError:
        pass
    return out


def tail(path, n=TAIL):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def last_with(rec, key):
    return next((r for r in reversed((rec or {}).get("results", [])) if key in r), None)


def targets(records):
    """The issue's targets beside what fast_step measured (bench/train_step.py computes both), and its KD and LM-only
    rows against the anchor's plain-torch rows from the same call."""
    step = last_with(records.get("fast_step"), "targets")
    if not step or not step["targets"]:
        return None
    out = dict(step["targets"])
    anchor = {r.get("variant", "").split("@")[0]: r for r in (records.get("fast_anchor") or {}).get("results", [])
              if "tokens_per_s" in r}
    for ours, theirs in (("distillery", "liger_kd"), ("distillery_lm", "lm_only")):
        if theirs in anchor and "tokens_per_s" in step.get(ours, {}):
            out[f"{ours}_vs_anchor_{theirs}"] = round(step[ours]["tokens_per_s"] / anchor[theirs]["tokens_per_s"], 3)
    return out


def child_env(mode, wheels):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("OUT", None)  # our children write where they are told, not into the device's return folder
    path = [REPO]
    if mode == "gpu" and wheels:
        path.insert(0, SITE)
        env["PATH"] = os.path.join(SITE, "bin") + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join(path + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if mode == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")  # tiny shapes on a shared 2-core box: threads only add contention
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checks", nargs="*", help="check or part names to (re)run; default: all, in order")
    ap.add_argument("--cpu", action="store_true", help="the CPU twin")
    ap.add_argument("--t0", type=float, default=None, help="start of the call (epoch s; gpu_checks.sh passes it)")
    ap.add_argument("--total", type=float, default=None, help="override the call's limit in seconds (tests)")
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else gpu_out/)")
    ap.add_argument("--work", default=None, help="scratch folder for data and runs (default /tmp/distillery-checks-"
                    "MODE)")
    ap.add_argument("--anchor", default=None, help="path of gpu_anchor.py (default: found under shared/)")
    ap.add_argument("--list", action="store_true", help="print the table and exit")
    a = ap.parse_args(argv)
    mode = "cpu" if a.cpu else "gpu"
    if a.list:
        for c in CHECKS:
            print(f"{c.name:<18} {c.part:<6} gpu {c.gpu_s:>3} s  cpu {c.cpu_s if c.cpu_s is not None else '-':>3} s  "
                  f"{c.cmd}")
        print(f"GPU total {sum(c.gpu_s for c in CHECKS)} s of {TOTAL_S['gpu'] - MARGIN_S}; CPU total "
              f"{sum(c.cpu_s or 0 for c in CHECKS)} s of {TOTAL_S['cpu'] - MARGIN_S}")
        return 0
    checks = select(a.checks)
    wheels = sorted(glob.glob(os.path.join(REPO, ".whl", "*.whl"))) if mode == "gpu" else []
    fields = dict(py=sys.executable, dev="--gpu" if mode == "gpu" else "", out=os.path.abspath(
                  a.out or os.environ.get("OUT") or os.path.join(REPO, "gpu_out")),
                  work=os.path.abspath(a.work or f"/tmp/distillery-checks-{mode}"), peak=0,
                  anchor=find_anchor(a.anchor) or "", wheels=" ".join(shlex.quote(w) for w in wheels))
    os.makedirs(fields["work"], exist_ok=True)
    runner = Runner(checks, mode, fields["out"], a.t0 or time.time(), a.total or TOTAL_S[mode], fields,
                    child_env(mode, wheels))
    rec = runner.run()
    return 0 if rec["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(cli(main))
