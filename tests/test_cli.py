"""The ``onfh`` dispatcher: each group imports only its role's module, and a site never imports ``sim``.

Every check runs in a fresh interpreter and reads its ``sys.modules``: what a command imported is what a
hospital's machine would load (wall time is not asserted; ``onfh --help`` is timed in the README).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from shared_models.cli import ROLES, build_parser, chosen_group

HEAVY = ("torch", "monai", "flwr", "SimpleITK", "pydicom")


def _imported_after(code: str, tmp_path=None) -> dict:
    """Run ``code`` (which may call ``main``) in a fresh interpreter; return its exit code and the
    top-level packages it imported of interest."""
    probe = (
        "import json, sys\n"
        "from shared_models.cli import main\n"
        "code = None\n"
        "try:\n" + "".join(f"    {line}\n" for line in code.splitlines()) + "except SystemExit as stop:\n"
        "    code = stop.code\n"
        "names = sorted({m.split('.')[0] for m in sys.modules})\n"
        "print(json.dumps({'code': code, 'modules': names, 'sim': sorted(m for m in sys.modules "
        "if m == 'sim' or m.startswith('sim.'))}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path or None
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["site", "--help"],
        ["site", "check", "--help"],
        ["site", "daemon", "--help"],
        ["infer", "--help"],
        ["bundle", "export-monai", "--help"],
        ["coordinator", "--help"],
        ["coordinator", "launch", "--help"],
    ],
)
def test_help_imports_neither_torch_monai_flower_nor_sim(argv):
    seen = _imported_after(f"code = main({argv!r})")
    assert seen["code"] == 0
    assert not set(HEAVY) & set(seen["modules"]), set(HEAVY) & set(seen["modules"])
    assert seen["sim"] == []


def _commands(group: str) -> list[str]:
    """The commands of ``onfh GROUP``, read from its parser (a command added later is checked too)."""
    parser = build_parser([group])
    groups = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = next(a for a in groups.choices[group]._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(commands.choices)


@pytest.mark.parametrize(
    "argv",
    [["sim", "--help"], ["report", "--help"]]
    + [["sim", command, "--help"] for command in _commands("sim")]
    + [["report", command, "--help"] for command in _commands("report")],
    ids=" ".join,
)
def test_researcher_help_imports_neither_torch_monai_nor_flower(argv):
    """Building the ``sim`` and ``report`` parsers reads only torch-free names
    (:mod:`sim.experiments.medmnist_runs`, :mod:`shared_models.specs`); the commands import the rest when run
    (SciPy, scikit-learn and matplotlib too)."""
    seen = _imported_after(f"code = main({argv!r})")
    assert seen["code"] == 0
    heavy = {*HEAVY, "scipy", "sklearn", "matplotlib"} & set(seen["modules"])
    assert not heavy, heavy


def test_sim_group_lists_every_researcher_command():
    assert _commands("sim") == ["bench", "compare", "demo", "medmnist", "phantoms", "run"]


def test_top_level_help_imports_no_role_module():
    seen = _imported_after("code = main(['--help'])")
    assert not {"client", "server", "sim", "strategies"} & set(seen["modules"])


def test_site_commands_run_without_importing_sim(tmp_path):
    """``site check`` and ``site daemon`` (through its preflight, which reads the site folder) and the
    modules the SuperNode loads (ClientApp, fork server) never import ``sim``; ``infer`` neither."""
    empty = tmp_path / "site"
    empty.mkdir()
    seen = _imported_after(
        "import client.client_app, client.clientapp_forkserver\n"
        f"assert main(['site', 'check', '--data', {str(empty)!r}]) == 1\n"
        f"assert main(['site', 'daemon', '--data', {str(empty)!r}, '--superlink', '127.0.0.1:9', "
        f"'--ca-cert', {str(tmp_path / 'ca.crt')!r}]) == 1\n"
        f"assert main(['infer', '--bundle', {str(tmp_path / 'none')!r}, '--study', {str(empty)!r}, "
        f"'--out', {str(tmp_path / 'out')!r}, '--allow-unsigned']) == 1\n"
        "code = 0\n",
        tmp_path,
    )
    assert seen["code"] == 0
    assert "torch" in seen["modules"] and "flwr" in seen["modules"]  # the probe did load the site's code
    assert seen["sim"] == []


def test_python_dash_m_sim_cli_is_onfh():
    done = subprocess.run(
        [sys.executable, "-m", "sim.cli", "site", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "verify-audit" in done.stdout and done.stdout.startswith("usage: onfh site")


def test_every_role_module_fills_its_group():
    parser = build_parser()
    for group in ROLES:
        with pytest.raises(SystemExit) as stop:  # a group without its command is a usage error
            parser.parse_args([group] if group != "infer" else ["infer", "--bundle", "b"])
        assert stop.value.code == 2
    assert build_parser().parse_args(["site", "keys"]).func.__module__ == "client.cli"
    assert build_parser().parse_args(["coordinator", "status", "--out", "o"]).func.__module__ == "server.cli"
    assert build_parser().parse_args(["sim", "phantoms", "--out", "o"]).func.__module__ == "sim.cli"
    assert build_parser(["site", "keys"]).parse_args(["site", "keys"]).out == "site-keys"


def test_chosen_group_skips_global_options():
    assert chosen_group(["-v", "site", "check"]) == "site"
    assert chosen_group(["--help"]) is None


def test_every_role_maps_a_refused_bundle_to_exit_1(tmp_path, capsys):
    """A bundle that fails verification is bad input in every role (exit 1, one line), never a traceback."""
    import importlib

    from shared_models.bundle import BundleError, generate_signing_key
    from shared_models.cli import main

    for module in {module for module, _ in ROLES.values()}:
        assert BundleError in importlib.import_module(module).handled_errors(), module
    key = tmp_path / "key.pem"
    generate_signing_key(key)
    (tmp_path / "empty").mkdir()
    assert main(["site", "verify", "--bundle", str(tmp_path / "empty"), "--public-key", f"{key}.pub"]) == 1
    assert "error:" in capsys.readouterr().out
    run = tmp_path / "run"
    (run / "bundle").mkdir(parents=True)
    (run / "bundle" / "MANIFEST.sig").write_bytes(b"not a signature")  # signed-looking, does not verify
    argv = ["coordinator", "pull", "--home", str(tmp_path), "--out", str(run), "--dest", str(tmp_path / "copy")]
    assert main([*argv, "--public-key", f"{key}.pub"]) == 1
    assert "error:" in capsys.readouterr().out and not (tmp_path / "copy").exists()
