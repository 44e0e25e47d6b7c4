"""device.py without a process group: which device, when a process belongs to a group, the
environment a group needs (each mistake one DeviceError naming the variable), and run_cli's exits."""
import io
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from harness import cli, dist
from harness.cli import GuardedStdout
from harness.dist import DeviceError, Dist, pick_device


def test_pick_device_auto_is_the_best_available_and_names_are_checked(monkeypatch):
    for cuda, mps, expected in ((True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        try:
            assert pick_device("auto").type == expected
        finally:                                      # "cuda" turns TF32 on: leave the process as it was
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    monkeypatch.undo()
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="expected auto, cpu, cuda or mps"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            pick_device("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(DeviceError, match="MPS is not available"):
            pick_device("mps")


@pytest.mark.parametrize("env, group", [({}, False), ({"RANK": "0"}, False), ({"WORLD_SIZE": "2"}, False),
                                        ({"RANK": "0", "WORLD_SIZE": "1"}, True)])
def test_a_process_belongs_to_a_group_when_rank_and_world_size_are_set(monkeypatch, env, group):
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert dist.launched_by_torchrun() is group
    if not group:
        d = Dist("cpu")
        assert (d.enabled, d.rank, d.world, d.main) == (False, 0, 1, True)
        model = torch.nn.Linear(2, 2)
        assert d.wrap(model) is model and d.any(True) is True and d.any(False) is False
        assert d.mean(torch.tensor(2.5)) == 2.5 and d.share({"a": 1}) == {"a": 1}
        assert d.max_param_difference(model) == 0.0


@pytest.mark.parametrize("env, needle", [
    ({"MASTER_ADDR": None, "MASTER_PORT": "29500"}, "MASTER_ADDR not"),
    ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": None}, "MASTER_PORT not"),
    ({"MASTER_ADDR": None, "MASTER_PORT": None}, "MASTER_ADDR and MASTER_PORT not"),
    ({"RANK": "one"}, "must be integers"), ({"RANK": "2"}, "RANK=2 is not one of the WORLD_SIZE=2"),
    ({"RANK": "-1"}, "RANK=-1 is not one of"), ({"MASTER_PORT": "65536"}, "MASTER_PORT='65536'"),
    ({"MASTER_PORT": "0"}, "MASTER_PORT='0'"), ({"MASTER_ADDR": "no-such-host.invalid"}, "no such host")])
def test_a_half_set_group_environment_is_one_error_naming_it(monkeypatch, env, needle):
    import socket

    def lookup(host, *args, **kwargs):                  # no real DNS: offline machines, slow resolvers
        if host.endswith(".invalid"):
            raise socket.gaierror(-2, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]
    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setattr(dist, "answers", lambda *a: False)   # a check that let it through fails fast, not in 30 s
    full = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", **env}
    for k, v in full.items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    with pytest.raises(DeviceError, match=needle):
        Dist("cpu")


def test_run_cli_exit_codes(capsys):
    class Bad(cli.UsageError):
        pass

    def main(argv):
        if argv == ["bad"]:
            raise Bad("no such thing")
        if argv == ["stop"]:
            raise KeyboardInterrupt
        print("done")
        return 3
    assert cli.run_cli(main, ["ok"]) == 3
    assert capsys.readouterr().out == "done\n"
    with pytest.raises(SystemExit) as e:
        cli.run_cli(main, ["bad"])
    assert e.value.code == "test_device.py: error: no such thing"
    assert cli.run_cli(main, ["stop"]) == 130
    assert capsys.readouterr().err == "test_device.py: interrupted\n"
    assert not isinstance(sys.stdout, GuardedStdout), "stdout is given back"


def test_guarded_stdout_drops_what_cannot_be_printed_and_keeps_the_error():
    class Closed(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")
    g = GuardedStdout(Closed())
    assert g.write("abc") == 3 and isinstance(g.error, BrokenPipeError)
    assert g.write("more") == 4
    ok = GuardedStdout(io.StringIO())
    ok.write("x")
    ok.flush()
    assert ok.stream.getvalue() == "x" and ok.error is None and ok.getvalue() == "x"


@pytest.mark.parametrize("error, code, message", [
    (BrokenPipeError(32, "Broken pipe"), 0, ""),                          # `| head` closed the pipe: not an error
    (OSError(28, "No space left on device"), 1, "test_device.py: error: could not print to stdout (No space left on device)")])
def test_run_cli_finishes_the_work_when_stdout_goes_away(monkeypatch, capsys, error, code, message):
    class Gone(io.StringIO):
        def write(self, text):
            raise error
    work = []

    def main(argv):
        print("first path")
        work.append("second file written")
        print("second path")
        return 0
    monkeypatch.setattr(sys, "stdout", Gone())
    assert cli.run_cli(main, []) == code
    assert work == ["second file written"]
    assert capsys.readouterr().err.strip().startswith(message) if message else capsys.readouterr().err == ""


# every script ends in run_cli(main): the errors a user can act on are one line, Ctrl-C is 130,
# its main's code is the exit code, and a bug keeps its traceback
SCRIPTS = {"train": [], "sample": ["SampleError"], "evaluate": [], "lora_finetune": [],
           "visualize": ["VisualizeError"], "lora_table": ["TableError"], "bench": []}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_scripts_errors_are_one_line_under_its_own_name(script, monkeypatch, capsys):
    import importlib

    from harness import scripts
    module = importlib.import_module(script)
    assert 'if __name__ == "__main__":\n    sys.exit(run_cli(main))' in open(module.__file__).read()
    own = [getattr(scripts if name == "SampleError" else module, name) for name in SCRIPTS[script]]
    for error in [*cli.ERRORS, *own]:

        def fail(argv, error=error):
            raise error("the reason")
        fail.__module__ = module.__name__             # as the script's own main: its name is the prog
        with pytest.raises(SystemExit) as e:
            cli.run_cli(fail, [])
        assert e.value.code == f"{script}.py: error: the reason", error.__name__
    monkeypatch.setattr(module, "main", lambda argv: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli.run_cli(module.main, [], prog=f"{script}.py") == 130
    assert capsys.readouterr().err == f"{script}.py: interrupted\n"
    monkeypatch.setattr(module, "main", lambda argv: 7 if argv == ["x"] else 0)
    assert cli.run_cli(module.main, ["x"], prog=f"{script}.py") == 7
    monkeypatch.setattr(module, "main", lambda argv: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError):                     # a bug is not an expected error: it shows
        cli.run_cli(module.main, [], prog=f"{script}.py")


def test_run_cli_names_a_main_without_a_file_by_argv0(monkeypatch):
    """`python -c`, a REPL or a notebook: no module file, so the program is sys.argv[0], not a traceback."""
    def main(argv):
        raise cli.UsageError("the reason")
    main.__module__ = "__main__-without-a-file"
    monkeypatch.setattr(sys, "argv", ["/somewhere/prog.py"])
    with pytest.raises(SystemExit) as e:
        cli.run_cli(main, [])
    assert e.value.code == "prog.py: error: the reason"


def test_a_missing_required_package_is_one_line_and_any_other_import_error_shows():
    def needs(name):
        def main(argv):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return main
    for name in ("matplotlib", "mlxtend", "safetensors.torch"):
        with pytest.raises(SystemExit) as e:
            cli.run_cli(needs(name), [], prog="x.py")
        assert e.value.code == (f"x.py: error: the package {name.split('.')[0]} is missing: "
                                "pip install -r requirements.txt")
    for name in ("kiwisolver", "typing_extensions"):        # what a package of requirements.txt needs
        with pytest.raises(SystemExit, match=f"the package {name} is missing: pip install -r requirements.txt"):
            cli.run_cli(needs(name), [], prog="x.py")
    for name in ("lora", "harness.rn"):                     # our own module missing is a bug: it shows
        with pytest.raises(ModuleNotFoundError):
            cli.run_cli(needs(name), [], prog="x.py")


@pytest.mark.parametrize("package,script", [("torch", "train.py"), ("numpy", "sample.py"), ("tqdm", "tools/bench.py"),
                                            ("torch", "tools/lora_table.py")])
def test_a_package_missing_at_a_scripts_own_imports_is_one_line(tmp_path, package, script):
    """torch, numpy or tqdm missing: the script's top-level import fails before run_cli exists."""
    (tmp_path / f"{package}.py").write_text(f"raise ModuleNotFoundError(\"No module named '{package}'\", name='{package}')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], env=env, capture_output=True, text=True)
    name = os.path.basename(script)
    assert (r.returncode, r.stdout, r.stderr) == (
        1, "", f"{name}: error: the package {package} is missing: pip install -r requirements.txt\n")


def test_an_interrupt_wrapped_by_a_library_is_an_interrupt(capsys):
    """torch.compile turns Ctrl-C into an InductorError caused by the KeyboardInterrupt: one line, 130."""
    def main(argv):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise RuntimeError("compiling failed") from e
    assert cli.run_cli(main, [], prog="x.py") == 130 and capsys.readouterr().err == "x.py: interrupted\n"
    assert not cli.interrupted(RuntimeError("a bug"))
