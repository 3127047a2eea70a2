"""Each bad input stops the run before any process group, model or file exists, with a one-line error."""
import os
import shutil
import subprocess
import sys

import pytest

import train
from conftest import BASE, REPO, clean_env, make_teacher
from distillery.config import ConfigError
from distillery.shards import DataError
from plugins import PluginError


def resolve(data_dir, out_dir, *overrides, ds_config="ds_configs/cpu.json"):
    return train.resolve(train.parse_args(["--ds_config", str(REPO / ds_config), f"data={data_dir}",
                                           f"out_dir={out_dir}", *BASE, *overrides]))


@pytest.fixture(scope="module")
def foreign_teacher(data_dir, tmp_path_factory):
    """A teacher whose tokenizer was trained on other text: same vocab size, different token -> id map."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    out = tmp_path_factory.mktemp("foreign") / "t"
    make_teacher(data_dir, out)
    for fn in os.listdir(out):
        if fn.startswith("tokenizer"):
            os.remove(out / fn)
    texts = [f"line {i} of an unrelated corpus about {w}" for i, w in enumerate(["cats", "maps", "tea"] * 200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(out))
    return str(out)


@pytest.mark.parametrize("overrides, exc, needle", [
    (["teacher=/no/such/dir", "alpha=0.5"], DataError, "teacher '/no/such/dir' not found"),
    (["alpha=0.5", "teacher="], ConfigError, "needs a teacher"),
    (["divergence=nope", "alpha=0"], PluginError, "unknown divergence plugin 'nope'; known: "),
    (["mix=nope", "alpha=0"], PluginError, "unknown mix plugin"),
    (["callbacks=[progress,nope]", "alpha=0"], PluginError, "unknown callback plugin 'nope'"),
    (["alhpa=0.5"], ConfigError, "unknown config key 'alhpa' in the command line; did you mean 'alpha'?"),
    (["global_batch_size=10", "alpha=0"], ConfigError, "global_batch_size=10 is not micro_batch_size=4"),
    (["data=/no/such/data", "alpha=0"], DataError, "python -m data_prep.offline"),
    (["seq_len=128", "alpha=0"], ConfigError, "re-pack the data"),
    (["eval_sets=[nope]", "alpha=0"], DataError, "eval set(s) nope not in"),
    (["eval_data=/no/such/evals", "alpha=0"], DataError, "no data set at '/no/such/evals'"),
    (["alpha=1.5"], ConfigError, "alpha=1.5 must be in [0, 1]"),
    (["alpha=zero"], ConfigError, "wants float"),
    (["train_tokens=10", "alpha=0"], ConfigError, "less than one global batch"),
    (["callback_args={eval_final: {windw: 3}}", "alpha=0"], PluginError,
     "callback eval_final: unknown option(s) windw; known: batch_size, data"),
    (["callback_args={eval_downstream: {every: 5}}", "alpha=0"], PluginError,
     "callback_args names eval_downstream, which is not in callbacks="),
    (["callbacks=[eval_downstream]", "alpha=0"], PluginError, "eval_downstream needs tasks"),
])
def test_bad_input_errors(data_dir, tmp_path, overrides, exc, needle):
    with pytest.raises(exc) as e:
        resolve(data_dir, tmp_path, *overrides)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    assert not os.listdir(tmp_path)  # nothing written: no run dir, no partial checkpoint


def test_foreign_tokenizer_teacher(data_dir, foreign_teacher, tmp_path):
    with pytest.raises(DataError, match="teacher tokenizer .* does not match data set"):
        resolve(data_dir, tmp_path, f"teacher={foreign_teacher}", "alpha=0.5")
    assert not os.listdir(tmp_path)


def test_teacher_without_tokenizer(data_dir, teacher_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(teacher_dir, bare)
    for fn in os.listdir(bare):
        if fn.startswith("tokenizer"):
            os.remove(bare / fn)
    with pytest.raises(DataError, match="no loadable tokenizer"):
        resolve(data_dir, tmp_path / "runs", f"teacher={bare}", "alpha=0.5")


def test_ds_config_must_not_set_batch_sizes(data_dir, tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}}')
    with pytest.raises(ConfigError, match="remove them from the JSON"):
        resolve(data_dir, tmp_path / "runs", "alpha=0", ds_config=str(bad))


def test_padded_teacher_vocab_is_accepted(data_dir, tmp_path):
    """A teacher with extra (padded) output rows shares the tokenizer: KD runs over the real vocab."""
    import json
    t = make_teacher(data_dir, tmp_path / "padded")
    cfg = json.load(open(os.path.join(t, "config.json")))
    from transformers import AutoModelForCausalLM
    from distillery.models import hf_config
    hf = hf_config("micro", cfg["vocab_size"] + 64, 64)
    AutoModelForCausalLM.from_config(hf).save_pretrained(t)
    plan = resolve(data_dir, tmp_path / "runs", f"teacher={t}", "alpha=0.5")
    assert plan.objective.kd_vocab == cfg["vocab_size"]


def test_cli_prints_one_line_and_exits_2(data_dir, tmp_path):
    p = subprocess.run([sys.executable, "train.py", "--ds_config", "ds_configs/cpu.json", f"data={data_dir}",
                        f"out_dir={tmp_path}", "alpha=0.5", "teacher=/no/such/dir"],
                       cwd=REPO, capture_output=True, text=True, timeout=120, env=clean_env())
    assert p.returncode == 2
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "teacher '/no/such/dir' not found" in lines[0]
    assert not os.listdir(tmp_path)


def test_callback_error_prints_one_line(data_dir, tmp_path):
    """An evaluation callback's error (here: eval_final told to read a data dir that does not exist) stops the run
    before its first step with one `error:` line and exit code 2, not a traceback."""
    p = subprocess.run([sys.executable, "train.py", "--ds_config", "ds_configs/cpu.json", f"data={data_dir}",
                        f"out_dir={tmp_path}", *BASE, "alpha=0", "name=cb", "callbacks=[eval_final]",
                        "callback_args={eval_final: {data: /no/such/evals}}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=clean_env())
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: eval_final: no data dir at '/no/such/evals'; set callback_args.eval_final.data to a "
                     "data_prep output directory"]
    assert "Traceback" not in p.stderr
    assert not os.path.exists(tmp_path / "cb" / "metrics.jsonl")  # no step ran


# Issue 20, item 3: options the first micro-step used to find (a TypeError / ValueError from the divergence, after
# config.yaml was written) and attn_impl (a transformers error while the engines were built) stop resolve() instead.
@pytest.mark.parametrize("overrides, needle", [
    (["divergence_args={bogus: 1}"], "divergence forward_kl rejects divergence_args {'bogus': 1}"),
    (["divergence=top_k"], "divergence top_k rejects divergence_args {}: top_k: give exactly one of k"),
    (["divergence=top_k", "divergence_args={k: 0}"], "top_k: k must be >= 1, got 0"),
    (["divergence=jsd", "divergence_args={beta: 2}"], "jsd: beta must be in [0, 1], got 2"),
    (["attn_impl=bogus"], "attn_impl='bogus' is not an attention kernel transformers knows"),
])
def test_options_used_only_by_the_first_step_are_checked_in_resolve(data_dir, teacher_dir, tmp_path, overrides,
                                                                     needle):
    with pytest.raises(ConfigError) as e:
        resolve(data_dir, tmp_path, "alpha=0.5", f"teacher={teacher_dir}", *overrides)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not os.listdir(tmp_path)


def test_eval_sets_smaller_than_a_window_are_said_and_refused(tmp_path, capfd):
    """Issue 20, item 7: a data set whose held-out split drew no document (12 documents, 3 % held out by content hash)
    is reported by data_prep when it is built; a run that would evaluate on a set shorter than one eval_window is
    refused in resolve(), in one line, instead of training to the end and dying in the final evaluation."""
    from data_prep import offline
    data = tmp_path / "d"
    offline.main(["--out", str(data), "--vocab_size", "512", "--seq_len", "64", "--max_train_mb", "0.3",
                  "--workers", "0"])
    err = capfd.readouterr().err
    assert "warning: split heldout of" in err and "is empty (0 tokens" in err, err
    out = tmp_path / "runs"
    with pytest.raises(DataError) as e:
        resolve(data, out, "alpha=0")
    msg = str(e.value)
    assert "eval set(s) heldout (0 tokens)" in msg and "eval_window=64" in msg and "\n" not in msg, msg
    assert not out.exists()
    with pytest.raises(DataError, match=r"ood_english \(\d+ tokens\) .*eval_window=1000000"):
        resolve(data, out, "alpha=0", "eval_sets=[ood_english]", "eval_window=1000000")
    assert resolve(data, out, "alpha=0", "eval_sets=[ood_english,ood_c]").cfg.eval_sets == ["ood_english", "ood_c"]
    assert resolve(data, out, "alpha=0", "eval_interval=-1", "callbacks=[progress]")  # nothing evaluates: no check
    assert not out.exists()
