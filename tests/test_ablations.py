"""benchmarks/ablations.py: each ablation's flags turn off a component that computes, the equal-time step count
matches the default's time, and the runs, plan and table come from the logs."""
import dataclasses
import re

import pytest
import torch
from conftest import load_script
from test_model import BOS, _call, _loss_and_grads, _randomize, _tokens_with_documents

import train_gpt


@pytest.fixture(scope="module")
def ablations():
    load_script("benchmarks/proxy_speedrun.py", "proxy_speedrun")
    return load_script("benchmarks/ablations.py", "ablations")


# The tiny preset with the default's switches: the tiny preset turns on every component the default has.
TINY_AS_DEFAULT = ["--preset=tiny"]


def _first_gradients(flags, weights):
    """Gradients of the first step's loss (its windows and loss weights) of the tiny model with `flags`, holding
    `weights` wherever its parameters have their names and shapes."""
    hp = train_gpt.parse_args([*TINY_AS_DEFAULT, *flags])
    torch.manual_seed(0)
    model = train_gpt.GPT(hp)
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in weights.items() if k in own and v.shape == own[k].shape}, strict=False)
    plan = train_gpt.plan_step(0, hp, train_gpt.derive(hp, 1))
    tokens = _tokens_with_documents(129, [0, 50], BOS)
    return _loss_and_grads(model, lambda: _call(model, tokens[:-1], tokens[1:], plan.windows,
                                                weights=plan.loss_weights))[1]


def _tiny_flags(ablations, name):
    """An arm's flags for the tiny model, as they are: an ablation's empty or switch off a field. (An addition's
    would name the full model's layers, which the tiny one lacks: this helper would need its tiny counterpart.)"""
    assert name not in ablations.ADDITIONS, f"{name}: give this helper the tiny model's layers for it"
    return list(ablations.ARMS[name][1])


def test_each_arm_turns_a_component_off_or_on_that_changes_the_first_step(ablations):
    """With the default's weights wherever the arm's model has the same parameter, the gradients of the shared
    parameters move by more than 0.01% (measured: 0.03% for the key offset, whose keys barely move the tiny model's
    near-uniform first-step attention; 7% to 197% for the others): the flags switch off (an ablation) or on (an
    addition) something that computes, not a no-op. Negative control: no flag, same weights, the same gradients exactly."""
    torch.manual_seed(0)
    default = train_gpt.GPT(train_gpt.parse_args(TINY_AS_DEFAULT))
    _randomize(default)
    weights = default.state_dict()
    base = _first_gradients([], weights)

    def change(grads):
        shared = [n for n in base if n in grads and grads[n].shape == base[n].shape]
        a, b = (torch.cat([g[n].flatten() for n in shared]) for g in (grads, base))
        return ((a - b).norm() / b.norm()).item()

    assert change(_first_gradients([], weights)) == 0.0, "negative control: the default reproduces itself"
    changes = {name: change(_first_gradients(_tiny_flags(ablations, name), weights)) for name in ablations.ARMS}
    assert all(c > 1e-4 for c in changes.values()), changes


def test_each_arm_changes_only_its_own_fields_of_the_default_recipe(ablations):
    """Each arm's flags change exactly the fields they name: none that the default already has (an ablation of a
    component the default lacks, or an addition of one it has, would be a no-op arm), none besides. Ablations and
    additions are told apart by their names."""
    assert not set(ablations.ABLATIONS) & set(ablations.ADDITIONS)
    default = dataclasses.asdict(train_gpt.Hyperparameters())
    for name, (_, flags) in ablations.ARMS.items():
        changed = {k for k, v in dataclasses.asdict(train_gpt.parse_args(list(flags))).items() if default[k] != v}
        assert changed == {f[2:].partition("=")[0] for f in flags}, f"{name}: its flags change {sorted(changed)}"


def test_equal_time_steps_are_the_ones_whose_predicted_time_is_the_defaults(ablations):
    """Same step times: the same count. 10% faster steps: the count whose predicted time is nearest the target
    (no neighbour nearer). A run that took 2% longer than its medians predict (first steps, jitter) gets fewer
    steps than the medians alone would give (the negative control of the scaling)."""
    hp = train_gpt.parse_args(["--num_iterations=190"])
    ms = [200.0, 400.0, 600.0, 650.0]
    estimate = ablations.proxy_speedrun.schedule_estimate_s
    target = estimate(hp, ms, 190)
    assert ablations.equal_time_iterations(hp, ms, target, target) == 190
    faster = [0.9 * x for x in ms]
    n = ablations.equal_time_iterations(hp, faster, estimate(hp, faster, 190), target)
    miss = {k: abs(estimate(hp, faster, k) - target) for k in (n - 1, n, n + 1)}
    assert n > 190 and miss[n] <= min(miss[n - 1], miss[n + 1]), (n, miss)
    assert ablations.equal_time_iterations(hp, ms, 1.02 * target, target) < 190


def test_a_component_that_costs_no_time_is_at_equal_time_in_round_1_and_not_run_again(ablations):
    """Round 1 at the budget's steps: an ablation as fast as the default is planned at the same count, so its
    round-1 runs stand for that budget (marked "round 1" in the table) and round 2 leaves it out; one 10% faster
    gets more steps, is run again, and until then shows "not run" (negative control). Another budget (--at)
    never reuses round 1."""
    hp = train_gpt.parse_args(["--num_iterations=190"])
    ms = [200.0, 400.0, 600.0, 650.0]
    seconds = ablations.proxy_speedrun.schedule_estimate_s(hp, ms, 190)

    def arm(flags, stage_ms, losses):
        return ablations.Arm(train_gpt.parse_args(["--num_iterations=190", *flags]), losses,
                             [seconds * stage_ms[-1] / ms[-1]] * len(losses), stage_ms)
    arms = {"default": arm([], ms, [1.97, 1.972]), "no_smear": arm(["--smear=false"], ms, [1.98, 1.981]),
            "no_bigram": arm(["--bigram_buckets=0"], [0.9 * x for x in ms], [2.03, 2.04])}
    plan = ablations.equal_time_plan(arms, ["no_smear", "no_bigram"])[1]
    assert plan["no_smear"] == 190 and plan["no_bigram"] > 190, plan
    assert ablations.at_equal_time_in_round_1(plan, arms, 190) == {"no_smear"}
    assert ablations.at_equal_time_in_round_1(plan, arms, 250) == set(), "another budget runs round 2"
    rows = {line.split("|")[1].strip(): line for line in ablations.table(arms, ["no_smear", "no_bigram"]).splitlines()
            if line.startswith("| ") and "`" in line}
    assert "190, 2, +0.0095" in rows["smear"] and "(round 1)" in rows["smear"], rows["smear"]
    assert rows["bigram hash embedding"].count("not run") == 1, rows["bigram hash embedding"]


def _tiny_run(tiny_corpus, log_dir, run_id, seed, *flags):
    args = [*TINY_AS_DEFAULT, *tiny_corpus["flags"], f"--log_dir={log_dir}", f"--run_id={run_id}", f"--seed={seed}",
            "--num_iterations=6", "--val_loss_every=0", "--warmup_steps=0", *flags]
    assert train_gpt.main(args) == 0


def _variants(argv):
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--variant"]


def test_plan_and_table_come_from_the_logs_and_runs_get_their_variants(ablations, tiny_corpus, tmp_path, capsys,
                                                                       monkeypatch):
    """Round 1's logs (default and no_smear, 2 seeds) give no_smear's equal-time step count, and `equal_time
    --data` passes it to proxy_speedrun.py as a variant of its own, beside the default run again; a larger budget
    (--at) gives more steps. The table has a row per ablation and a column per budget that ran, "not run" where
    none ran."""
    for seed in (0, 1):
        _tiny_run(tiny_corpus, tmp_path, f"default_{seed}", seed)
        _tiny_run(tiny_corpus, tmp_path, f"no_smear_{seed}", seed, "--smear=false")
    logs = sorted(str(p) for p in tmp_path.glob("*.txt"))
    assert ablations.main(["equal_time", "--only", "no_smear", "--logs", *logs]) == 0
    planned = int(re.search(r"no_smear: --num_iterations=(\d+)", capsys.readouterr().out).group(1))
    assert ablations.main(["equal_time", "--only", "no_smear", "--logs", *logs, "--at", "12"]) == 0
    out = capsys.readouterr().out
    assert "budget: the default's 12 steps" in out and "(predicted from round 1)" in out, out
    planned_12 = int(re.search(r"no_smear: --num_iterations=(\d+)", out).group(1))
    assert planned_12 > planned, "a larger budget"

    calls = []
    monkeypatch.setattr(ablations.proxy_speedrun, "main", lambda argv: calls.append(argv) or 0)
    # (at 12 steps: at round 1's 6, a no_smear planned at 6 steps would be round 1 again, and not run)
    assert ablations.main(["equal_time", "--only", "no_smear", "--logs", *logs, "--at", "12", "--data", "D",
                           "--runs", "2", "--", "--cycle_train_data=true"]) == 0
    argv = calls[-1]
    assert _variants(argv) == ["default_eq12=--num_iterations=12",
                               f"no_smear_eq12=--smear=false --num_iterations={planned_12}"], _variants(argv)
    assert argv[argv.index("--") + 1:] == ["--cycle_train_data=true"] and argv[argv.index("--nproc") + 1] == "1"
    assert ablations.main(["equal_time", "--only", "no_xsa", "--logs", *logs, "--data", "D"]) == 1
    assert len(calls) == 1, "no ablation of round 1 to run: nothing is launched (not the default alone)"
    assert ablations.main(["run", "--only", "no_xsa,no_mtp", "--data", "D"]) == 0
    assert _variants(calls[-1]) == ["default=", "no_xsa=--xsa_layers=", "no_mtp=--mtp_weights=1;1;1"]
    assert ablations.main(["run", "--only", "no_xsa", "--data", "D", "--without_default"]) == 0
    assert _variants(calls[-1]) == ["no_xsa=--xsa_layers="], "a round's later call leaves the default out"

    for seed in (0, 1):  # round 2 at the default's 12 steps, as the plan asked
        _tiny_run(tiny_corpus, tmp_path, f"default_eq12_{seed}", seed, "--num_iterations=12")
        _tiny_run(tiny_corpus, tmp_path, f"no_smear_eq12_{seed}", seed, "--smear=false",
                  f"--num_iterations={planned_12}")
    logs = sorted(str(p) for p in tmp_path.glob("*.txt"))
    capsys.readouterr()
    assert ablations.main(["table", "--logs", *logs, str(tmp_path / "crashed.txt")]) == 0
    out = capsys.readouterr().out
    assert "crashed.txt: no usable log" in out, "a run without a log is left out, said so"
    assert "equal time, the default's 12 steps" in out and "Default, run again for the 12-step budget" in out, out
    smear = next(line for line in out.splitlines() if line.startswith("| smear | off |"))
    assert "| per-token gates, MUDD and DC (the public's) | off | `--gate_split_layer=0 --mudd=false --dc_layers=` |" \
        in out, "an ablation's row says its component is turned off, by the flags that do it"
    in_round_1 = planned == 6  # then a 6-step budget column shows round 1's runs, marked
    assert smear.count("| 2, ") == 1 and f"| {planned_12}, 2, " in smear, smear
    assert smear.count("(p = ") == 2 + in_round_1 and ("(round 1)" in smear) == in_round_1, smear
    assert sum(line.startswith("| ") and "| not run | not run | -" in line for line in out.splitlines()) == \
        len(ablations.ARMS) - 1, out


def test_unknown_ablation_names_are_refused_with_the_known_ones(ablations):
    with pytest.raises(SystemExit, match="no_such.*known: no_bigram"):
        ablations.chosen("no_smear,no_such")


def test_past_additions_are_the_default_now_and_only_table_takes_them(ablations):
    """An addition the default adopted (paired heads, turned back on; per-token gates, MUDD and DC) sets what the
    default already sets, so no round runs it (`run` and `equal_time` refuse its name), while `table` still reads
    the logs of results folders that ran it, in both rounds, as turned on."""
    default = train_gpt.Hyperparameters()
    assert ablations.PAST_ADDITIONS and not set(ablations.PAST_ADDITIONS) & set(ablations.ARMS)
    for name, (_, flags) in ablations.PAST_ADDITIONS.items():
        assert train_gpt.parse_args(list(flags)) == default, f"{name}: not the default's setting now; an ADDITION"
        with pytest.raises(SystemExit, match=f"unknown arm.*{name}"):
            ablations.chosen(name)
        assert ablations.chosen(name, ablations.KNOWN_ARMS) == [name]
        assert ablations.split_variant(f"{name}_eq330") == (name, 330) and ablations.turned(name) == "on"


def test_a_log_filed_under_another_ablations_name_is_refused(ablations, tiny_corpus, tmp_path):
    """A run's name says which ablation it is (and, in round 2, the budget's default steps); its logged recipe must
    be round 1's default with that ablation's flags, and default_eqN's must run N steps. Also: a recipe without
    extension steps still gets its last stage's time."""
    _tiny_run(tiny_corpus, tmp_path, "default_0", 0, "--extension_steps=0")
    _tiny_run(tiny_corpus, tmp_path, "no_xsa_0", 0, "--extension_steps=0", "--smear=false")
    logs = sorted(tmp_path.glob("*.txt"))
    with pytest.raises(SystemExit, match=r"no_xsa: its runs differ from default's in \['smear'\]"):
        ablations.read_arms(logs)
    (tmp_path / "no_xsa_0.txt").rename(tmp_path / "no_smear_0.txt")
    arms = ablations.read_arms(sorted(tmp_path.glob("*.txt")))
    assert set(arms) == {"default", "no_smear"} and ablations.last_stage_ms(arms["no_smear"]) > 0
    assert arms["default"].stage_ms[-1] == 0.0, "no extension step, no extension time"
    (tmp_path / "no_smear_0.txt").rename(tmp_path / "default_eq7_0.txt")
    with pytest.raises(SystemExit, match=r"default_eq7: its runs differ from default's in \['smear'\]"):
        ablations.read_arms(sorted(tmp_path.glob("*.txt")))
    (tmp_path / "default_eq7_0.txt").write_text((tmp_path / "default_0.txt").read_text())
    with pytest.raises(SystemExit, match="default_eq7: its runs have --num_iterations=6, not 7"):
        ablations.read_arms(sorted(tmp_path.glob("*.txt")))
    (tmp_path / "default_eq7_0.txt").write_text((tmp_path / "default_0.txt").read_text().replace(
        '"seed": 0,', '"seed": 0, "retired_flag": 1,'))
    arms = ablations.read_arms(sorted(tmp_path.glob("*.txt")))
    assert set(arms) == {"default"}, "a log of an older recipe (a flag this trainer no longer has) is left out"


def test_an_arms_flag_that_sets_what_its_default_had_changes_nothing(ablations, tiny_corpus, tmp_path):
    """no_skip turns MUDD off with the skip (MUDD reads it). Beside a default without MUDD (the older results
    folders), a run with the skip off is that arm and reads; a run filed as no_skip with the skip on does not
    (negative control)."""
    _tiny_run(tiny_corpus, tmp_path, "default_0", 0, "--mudd=false")
    _tiny_run(tiny_corpus, tmp_path, "no_skip_0", 0, "--mudd=false", "--skip_connection=")
    arms = ablations.read_arms(sorted(tmp_path.glob("*.txt")))
    assert set(arms) == {"default", "no_skip"}
    (tmp_path / "no_skip_0.txt").write_text((tmp_path / "default_0.txt").read_text())
    with pytest.raises(SystemExit, match=r"no_skip: its runs differ from default's in nothing; no_skip should "
                                         r"differ in \['skip_connection'\]"):
        ablations.read_arms(sorted(tmp_path.glob("*.txt")))


def _on_gpu(log, uuid):
    """The log as if rank 0 had run on the GPU of `uuid` (a CPU run's header names no GPU)."""
    text = log.read_text()
    marked = text.replace("\n" + train_gpt.RULE + "\nhyperparameters",
                          f"\ngpu: NVIDIA H200, bus 00000000:00:07.0, uuid {uuid}\n" + train_gpt.RULE
                          + "\nhyperparameters", 1)
    assert marked != text, "the log has the header line this inserts before"
    log.write_text(marked)


def test_times_measured_on_other_gpus_than_the_defaults_are_marked(ablations, tiny_corpus, tmp_path, capsys):
    """An ablation whose runs ran on other GPUs than the default's (another host: the logs' UUIDs differ) has its
    time marked "(other GPUs)" in the table, and its equal-time plan says that the count corrects for the GPUs
    too; on the default's own GPUs (negative control), or where a log names no UUID (older logs), nothing is
    marked."""
    _tiny_run(tiny_corpus, tmp_path, "default_0", 0)
    _tiny_run(tiny_corpus, tmp_path, "no_smear_0", 0, "--smear=false")
    _tiny_run(tiny_corpus, tmp_path, "no_mtp_0", 0, "--mtp_weights=1;1;1")
    _tiny_run(tiny_corpus, tmp_path, "no_xsa_0", 0, "--xsa_layers=")  # named no GPU: an older log
    _on_gpu(tmp_path / "default_0.txt", "GPU-aaaa")
    _on_gpu(tmp_path / "no_smear_0.txt", "GPU-aaaa")  # the default's GPU
    _on_gpu(tmp_path / "no_mtp_0.txt", "GPU-cccc")    # another host's
    logs = sorted(tmp_path.glob("*.txt"))
    arms = ablations.read_arms(logs)
    assert arms["default"].gpus == ["GPU-aaaa"] and arms["no_xsa"].gpus == [None], arms
    rows = {line.split("|")[1].strip(): line for line in ablations.table(arms, ["no_smear", "no_mtp", "no_xsa"])
            .splitlines() if line.startswith("| ") and "`" in line}
    assert "(other GPUs)" in rows["multi-token prediction (next token only)"], rows
    assert "(other GPUs)" not in rows["smear"] + rows["XSA"], "the default's GPUs, or not known: no mark"
    assert ablations.main(["equal_time", "--only", "no_smear,no_mtp,no_xsa", "--logs", *map(str, logs)]) == 0
    plan = {line.split(":")[0]: line for line in capsys.readouterr().out.splitlines()
            if line.startswith("no_") and "--num_iterations=" in line}  # the plan's lines, one per ablation
    assert "ran on other GPUs than default's" in plan["no_mtp"], plan
    assert "other GPUs" not in plan["no_smear"] + plan["no_xsa"], plan
