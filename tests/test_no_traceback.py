"""No command shows a traceback on a bad path.

Every command of the `pipe` app, found by walking its command tree (so a new command, or a
new option, is covered at once: the test fails until its parameters are classified below),
is run with each of its path parameters set, in turn, to what a path can wrongly be: a file
where a folder is expected, a folder where a file is expected, a missing path, a path under a
file, an unreadable folder, a path inside one, and a folder on a full disk. The other
arguments are valid, on a small embedded table with a trained Adaptor. Each run must end in
one message or succeed; the test fails on the word "Traceback" or on an exception that
escaped the command.

The unreadable cases run in a process without the capabilities that let root read every
folder; the full disk is a small tmpfs filled to the last byte, which needs root to mount.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cli import app
from tests.helpers import forked, make_table, pipe, write_png

ROOT = Path(__file__).resolve().parents[1]

# what a path parameter is: the kinds of bad value it gets are those that are not valid for it
CACHE, IN, OUT_DIR, OUT_FILE = "cache", "input", "output folder", "output file"
KINDS = ("file", "folder", "missing", "under-file", "unreadable", "in-unreadable", "full-disk")
VALID = {CACHE: {"folder", "missing"}, IN: set(), OUT_DIR: {"folder", "missing"}, OUT_FILE: {"file", "missing"}}
ROLES = {
    ("embed", "dataset"): IN, ("embed", "backbone"): IN, ("embed", "cache"): CACHE,
    ("train-adaptor", "dataset"): IN, ("train-adaptor", "config"): IN, ("train-adaptor", "out"): OUT_DIR,
    ("train-adaptor", "cache"): CACHE,
    ("evaluate", "dataset"): IN, ("evaluate", "adaptor"): IN, ("evaluate", "config"): IN,
    ("evaluate", "out"): OUT_DIR, ("evaluate", "cache"): CACHE,
    ("report", "runs"): IN, ("report", "html"): OUT_FILE, ("report", "out"): OUT_FILE,
    ("predict", "images"): IN, ("predict", "adaptor"): IN, ("predict", "prompts"): IN, ("predict", "head"): IN,
    ("predict", "bank"): IN, ("predict", "image_encoder"): IN, ("predict", "text_encoder"): IN,
    ("predict", "cache"): CACHE,
    ("export", "run"): IN, ("export", "out"): OUT_DIR, ("export", "heads"): IN, ("export", "results"): IN,
    ("export", "prompts"): IN, ("export", "cache"): CACHE,
    ("sweep", "spec"): IN, ("sweep", "cache"): CACHE,
    ("reproduce", "table"): IN, ("reproduce", "out"): OUT_DIR, ("reproduce", "cache"): CACHE,
    ("reproduce", "data"): IN, ("reproduce", "splits"): IN,
    ("demo", "out"): OUT_DIR, ("demo", "cache"): CACHE,
    ("doctor", "cache"): CACHE,
    ("cache ls", "cache"): CACHE, ("cache gc", "cache"): CACHE, ("cache verify", "cache"): CACHE,
    ("cache verify", "store"): IN, ("cache rm", "store"): IN, ("cache rm", "cache"): CACHE,
    ("data info", "dataset_opt"): IN, ("data info", "cache"): CACHE,
    ("data preview", "dataset_opt"): IN, ("data preview", "out"): OUT_FILE, ("data preview", "cache"): CACHE,
    ("data splits", "dataset_opt"): IN, ("data splits", "lists"): OUT_DIR, ("data splits", "cache"): CACHE,
}
# parameters that are not paths (a name, a number, a switch), or a path given another way (positional twins)
NOT_PATHS = {"batch_size", "device", "views", "shard_mb", "workers", "scheduler", "image_memory_mb", "lease_s",
             "columns", "no_patients", "allow_failures", "as_json", "trust_remote_code", "overrides", "args",
             "text_encoder", "backbone", "resident", "task", "fraction", "head", "seeds", "baseline", "fmt",
             "zero_shot", "bank_split", "top_k", "license", "plan", "only", "substitute", "pretrain_set",
             "eval_set", "n", "segmentation", "repair", "dry_run", "force", "seed", "write", "verify", "dataset",
             "threads", "show_version", "report", "help", "name", "fidelity", "fixed", "trials", "embed"}
# how some values are written: reproduce's --data and --splits take NAME=PATH and SOURCE:PATH
SPELLING = {("reproduce", "data"): "rsna={}", ("reproduce", "splits"): "benchx:{}"}


def base_args(w: dict) -> dict[str, dict]:
    """Per command, valid values of its parameters (a list: repeated or positional) and extra flags."""
    tiny = {"backbone": "tiny-vit", "text_encoder": "tiny-bert", "cache": w["cache"]}
    small = ["epochs=1", "batch_size=8", "adaptor.d_model=32", "adaptor.n_heads=2", "adaptor.ffn_dim=32"]
    return {
        "embed": {"dataset": w["table"], **tiny},
        "train-adaptor": {"dataset": w["table"], **tiny, "out": w["work"] / "train", "overrides": small},
        "evaluate": {"task": "retrieval", "dataset": w["table"], "adaptor": w["run"], "cache": w["cache"],
                     "out": w["work"] / "eval", "device": "cpu"},
        "report": {"runs": [w["eval"]]},
        "predict": {"images": [w["png"]], "adaptor": w["run"], "cache": w["cache"], "device": "cpu"},
        "export": {"run": w["run"], "out": w["work"] / "export", "cache": w["cache"]},
        "sweep": {"spec": w["sweep"], "cache": w["cache"]},
        "reproduce": {"table": "classification", "cache": w["cache"], "out": w["work"] / "paper", "plan": True},
        "demo": {"out": w["work"] / "demo", "cache": w["cache"], "n": "10", "backbone": "tiny-vit",
                 "text_encoder": "tiny-bert", "seeds": "1", "segmentation": False, "device": "cpu"},
        "encoders": {}, "doctor": {"cache": w["cache"]},
        "cache ls": {"cache": w["cache"]}, "cache gc": {"cache": w["cache"], "dry_run": True},
        "cache verify": {"cache": w["cache"]}, "cache rm": {"store": "0123456789ab", "cache": w["cache"],
                                                            "dry_run": True},
        "data readers": {}, "data info": {"dataset_opt": w["table"], "cache": w["cache"]},
        "data preview": {"dataset_opt": w["table"], "cache": w["cache"], "out": w["work"] / "grid.png", "n": "2"},
        "data splits": {"dataset_opt": w["table"], "cache": w["cache"], "lists": w["work"] / "lists", "write": True},
    }


def commands() -> dict[str, object]:
    """Every leaf command of the app, by its words (`cache ls`)."""
    found = {}

    def walk(cmd, words):
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, [*words, name])
        else:
            found[" ".join(words)] = cmd

    walk(typer.main.get_command(app), [])
    return found


def argv(command: str, cmd, values: dict) -> list[str]:
    """The command line of ``values``: positionals in order, then options (a flag for True)."""
    args, options = command.split(), []
    for p in cmd.params:
        if p.name not in values:
            continue
        v = values[p.name]
        vs = [str(x) for x in v] if isinstance(v, list) else [str(v)]
        if not p.opts[0].startswith("-"):
            args += vs
        elif v is True or v is False:
            flag = [o for o in (p.opts if v else p.secondary_opts) if o.startswith("--")]
            options += flag[:1]
        else:
            options += [x for value in vs for x in (p.opts[0], value)]
    return args + options


def cases(w: dict, kind: str) -> list[tuple[str, str, list[str]]]:
    """(command, parameter, argv) for every path parameter of every command that ``kind`` is bad for."""
    bases, out = base_args(w), []
    for command, cmd in commands().items():
        for p in cmd.params:
            role = ROLES.get((command, p.name))
            if role is None:
                continue
            if kind in VALID[role]:
                continue
            value = SPELLING.get((command, p.name), "{}").format(w["kinds"][kind])
            values = {**bases[command], p.name: [value] if isinstance(bases[command].get(p.name), list)
                      or p.nargs == -1 or getattr(p, "multiple", False) else value}
            out.append((command, p.name, argv(command, cmd, values)))
    return out


def run_case(args: list[str]) -> str | None:
    """None when the command ended in a message or succeeded; else what escaped it."""
    r = CliRunner().invoke(app, args)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        return "".join(traceback.format_exception(r.exception))[-3000:]
    if "Traceback" in r.output:
        return r.output[-3000:]
    return None


# ------------------------------------------------------------------------------ the small world
def bad_paths(base: Path) -> dict[str, Path]:
    """One path of each bad kind (the full disk is mounted by its own test)."""
    base.mkdir(parents=True)
    (base / "garbage.txt").write_text("not what any command wants\n")
    (base / "empty-folder").mkdir()
    locked = base / "locked"
    (locked / "inner").mkdir(parents=True)
    (locked / "inner" / "x").write_text("x")
    locked.chmod(0)
    return {"file": base / "garbage.txt", "folder": base / "empty-folder", "missing": base / "missing" / "nothing",
            "under-file": base / "garbage.txt" / "inside", "unreadable": locked, "in-unreadable": locked / "inner"}


def mount_full_disk(path: Path) -> bool:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        return False
    with open(path / "filler", "wb", buffering=0) as f:  # every byte taken
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return True


@pytest.fixture(scope="module")
def world():
    base = Path(tempfile.mkdtemp(prefix="no-traceback-"))
    w = {"base": base, "work": base / "work", "cache": base / "cache", "run": base / "run", "eval": base / "eval"}
    w["table"] = make_table(base / "data", 16)
    w["png"] = write_png(base / "scan.png", seed=5)
    pipe("embed", "-d", str(w["table"]), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", str(w["cache"]))
    pipe("train-adaptor", "-d", str(w["table"]), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", str(w["cache"]),
         "--out", str(w["run"]), "epochs=1", "batch_size=8", "adaptor.d_model=32", "adaptor.n_heads=2",
         "adaptor.ffn_dim=32")
    pipe("evaluate", "--task", "retrieval", "-d", str(w["table"]), "-a", str(w["run"]), "--cache", str(w["cache"]),
         "--out", str(w["eval"]), "--device", "cpu")
    w["sweep"] = base / "sweep.yaml"
    w["sweep"].write_text(f"dataset: {w['table']}\nbackbone: tiny-vit\ntext_encoder: tiny-bert\npreset: demo.yaml\n"
                          f"overrides: [epochs=1, batch_size=8]\ngrid:\n  optim.lr: [1.0e-3]\nout: {base / 'sweep'}\n"
                          "metric: val_i2t_r@10\n")
    w["kinds"] = bad_paths(base / "bad")
    yield w
    (base / "bad" / "locked").chmod(0o755)
    subprocess.run(["rm", "-rf", str(base)], check=False)


def test_every_parameter_of_every_command_is_classified():
    """A new command or option must say whether it takes a path (and which kind), or the matrix misses it."""
    bases = base_args({k: Path(k) for k in ("cache", "work", "run", "eval", "table", "png", "sweep")})
    for command, cmd in commands().items():
        assert command in bases, f"`pipe {command}` is new: give it valid arguments in base_args()"
        for p in cmd.params:
            assert (command, p.name) in ROLES or p.name in NOT_PATHS, \
                f"`pipe {command}` has a parameter {p.name!r}: add it to ROLES (a path) or NOT_PATHS"


def run_kind(world: dict, kind: str, monkeypatch) -> None:
    monkeypatch.delenv("PIPE_CACHE", raising=False)
    monkeypatch.chdir(world["base"])
    todo = cases(world, kind)
    assert len(todo) >= 10
    escaped = [f"pipe {' '.join(args)}\n{why}" for *_, args in todo if (why := run_case(args))]
    assert not escaped, f"{len(escaped)} of {len(todo)} runs escaped:\n\n" + "\n\n".join(escaped)


@pytest.mark.parametrize("kind", ["file", "folder", "missing", "under-file"])
def test_no_command_gives_a_traceback_on_a_bad_path(world, kind, monkeypatch):
    run_kind(world, kind, monkeypatch)


@pytest.mark.slow
def test_no_command_gives_a_traceback_on_a_full_disk(world, monkeypatch):
    full = world["base"] / "bad" / "full"
    if not mount_full_disk(full):
        pytest.skip("cannot mount a tmpfs here (it needs root), so no full disk")
    try:
        run_kind({**world, "kinds": {**world["kinds"], "full-disk": full / "inner"}}, "full-disk", monkeypatch)
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unreadable", "in-unreadable"])
def test_no_command_gives_a_traceback_on_an_unreadable_path(world, kind):
    """In a process that file permissions bind: root reads every folder, so the process runs without
    the capabilities that override them (tests/helpers/nocaps.py drops them, as setpriv would)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "COLUMNS": "160"}
    env.pop("PIPE_CACHE", None)
    world_json = json.dumps({k: str(v) for k, v in world.items() if isinstance(v, Path)} | {"kind": kind})
    done = forked.run([sys.executable, "-m", "tests.helpers.nocaps", "tests.test_no_traceback", world_json],
                      capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["ran"] >= 15


def _main(world_json: str) -> None:
    """The unreadable cases, in this process (run by the test above, bound by file permissions)."""
    given = json.loads(world_json)
    w = {k: Path(v) for k, v in given.items() if k != "kind"}
    w["kinds"] = {"unreadable": w["base"] / "bad" / "locked", "in-unreadable": w["base"] / "bad" / "locked" / "inner"}
    try:  # the cases test nothing in a process that can read the locked folder
        os.listdir(w["kinds"]["unreadable"])
        sys.exit(f"this process reads {w['kinds']['unreadable']} (mode 000): it is not bound by file permissions")
    except PermissionError:
        pass
    os.chdir(w["base"])
    todo = cases(w, given["kind"])
    escaped = [f"pipe {' '.join(args)}\n{why}" for *_, args in todo if (why := run_case(args))]
    print("\n\n".join(escaped))
    print(json.dumps({"ran": len(todo), "escaped": len(escaped)}))
    sys.exit(1 if escaped else 0)


if __name__ == "__main__":
    _main(sys.argv[1])
