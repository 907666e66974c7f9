"""SMF manifests are valid against illumos' service_bundle DTD; methods work."""

from __future__ import annotations

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SMF = REPO / "smf"
# Where the service_bundle DTD is found (smf/README.md names these places):
# $SNAPPER_SMF_DTD when set, else illumos' own place, then shared/ beside the
# checkout (this workplace). A clone with none of them skips, saying where it looked.
DTD_ENV = "SNAPPER_SMF_DTD"
DTD_PLACES = (Path("/usr/share/lib/xml/dtd/service_bundle.dtd.1"),
              REPO.parent / "shared" / "smf" / "service_bundle.dtd.1")


def find_dtd(env: dict[str, str] | os._Environ[str] = os.environ,
             places: tuple[Path, ...] = DTD_PLACES) -> Path | None:
    """The DTD to validate against; a $SNAPPER_SMF_DTD that names no file is an error."""
    named = env.get(DTD_ENV)
    if named:
        assert Path(named).is_file(), f"${DTD_ENV}={named}: no such file"
        return Path(named)
    return next((p for p in places if p.is_file()), None)


MANIFESTS = sorted((SMF / "manifests").glob("*.xml"))
METHODS = sorted(p for p in (SMF / "method").iterdir() if p.is_file())


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def _xmllint() -> str:
    found = shutil.which("xmllint")
    # Not a skip: an unvalidated manifest is what this test exists to prevent.
    assert found, "xmllint not found: apt-get install -y libxml2-utils"
    return found


def _start_exec(manifest: Path) -> str:
    root = ET.parse(manifest).getroot()
    starts = [m for m in root.iter("exec_method") if m.get("name") == "start"]
    assert len(starts) == 1, f"{manifest.name}: expected one start exec_method"
    exec_ = starts[0].get("exec")
    assert exec_
    return exec_


def _method_for(manifest: Path) -> Path:
    exec_path = Path(_start_exec(manifest).split()[0])
    method = SMF / "method" / exec_path.name
    assert method.is_file(), f"{manifest.name}: start method {exec_path} has no {method}"
    return method


def test_there_is_a_snapperd_manifest() -> None:
    assert SMF / "manifests" / "snapperd.xml" in MANIFESTS


@pytest.mark.parametrize("manifest", MANIFESTS, ids=_ids(MANIFESTS))
def test_manifest_valid_against_dtd(manifest: Path) -> None:
    dtd = find_dtd()
    if dtd is None:
        pytest.skip(f"service_bundle DTD not found: ${DTD_ENV} is unset and none is at "
                    + " or ".join(str(p) for p in DTD_PLACES))
    res = subprocess.run(
        [_xmllint(), "--noout", "--nonet", "--dtdvalid", str(dtd), str(manifest)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, f"{manifest.name} is not valid:\n{res.stderr}"
    assert "validity error" not in res.stderr, res.stderr


def test_the_dtd_is_looked_for_where_the_docs_say(tmp_path: Path) -> None:
    given = tmp_path / "service_bundle.dtd.1"
    given.write_text("<!ELEMENT service_bundle ANY>\n")
    absent = (tmp_path / "a", tmp_path / "b")
    assert find_dtd({}, absent) is None  # the test above then skips, naming the places
    assert find_dtd({}, (absent[0], given)) == given
    assert find_dtd({DTD_ENV: str(given)}, absent) == given
    with pytest.raises(AssertionError, match="no such file"):
        find_dtd({DTD_ENV: str(absent[0])}, (given,))
    readme = (SMF / "README.md").read_text()
    for place in (DTD_ENV, "/usr/share/lib/xml/dtd/", "../shared/smf/"):
        assert place in readme, place


@pytest.mark.parametrize("manifest", MANIFESTS, ids=_ids(MANIFESTS))
def test_manifest_shape(manifest: Path) -> None:
    root = ET.parse(manifest).getroot()
    (service,) = root.findall("service")
    exec_path = _start_exec(manifest).split()[0]
    # Installed tree mirrors the repo: <prefix>/smf/method/<name>.
    assert exec_path.startswith("/"), exec_path
    assert exec_path.endswith(f"/smf/method/{_method_for(manifest).name}"), exec_path

    stops = [m for m in service.iter("exec_method") if m.get("name") == "stop"]
    assert [m.get("exec") for m in stops] == [":kill"]
    # svcadm refresh: the daemon reloads its config on SIGHUP (no restart).
    refresh = [m for m in service.iter("exec_method") if m.get("name") == "refresh"]
    assert [m.get("exec") for m in refresh] == [":kill -HUP"]

    # A foreground daemon: startd must watch the exec'd child, not wait for an exit.
    duration = service.find("property_group[@name='startd']/propval[@name='duration']")
    assert duration is not None and duration.get("value") == "child"

    conf = service.find("property_group[@name='config']/propval[@name='file']")
    assert conf is not None, "no config/file property"
    assert conf.get("type") == "astring"
    assert (conf.get("value") or "").startswith("/")

    assert service.find("instance[@name='default']") is not None
    fmris = [f.get("value", "") for f in service.iter("service_fmri")]
    for want in ("svc:/milestone/network", "svc:/system/filesystem/local"):
        assert any(f == want or f.startswith(want + ":") for f in fmris), fmris

    ctx = service.find("method_context")
    assert ctx is not None and ctx.get("working_directory", "").startswith("/")


@pytest.mark.parametrize("method", METHODS, ids=_ids(METHODS))
def test_method_script_syntax(method: Path) -> None:
    assert method.read_text().startswith("#!/bin/sh\n")
    assert os.access(method, os.X_OK), f"{method} is not executable (git mode 755)"
    res = subprocess.run(["sh", "-n", str(method)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("manifest", MANIFESTS, ids=_ids(MANIFESTS))
def test_method_reads_config_property(manifest: Path) -> None:
    text = _method_for(manifest).read_text()
    assert 'svcprop -p config/file "$SMF_FMRI"' in text
    assert "exec " in text


# --- run the snapperd method off illumos, with stand-ins for svcprop and the daemon

FMRI = "svc:/smartdc/application/snapperd:default"


def _stub(bindir: Path, name: str, body: str) -> None:
    path = bindir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def _run_method(tmp_path: Path, conf_value: str | None) -> tuple[subprocess.Popen[str], str, str]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    if conf_value is None:
        _stub(bindir, "svcprop", 'echo "svcprop: Couldn\'t find property." >&2\nexit 1\n')
    else:
        _stub(
            bindir,
            "svcprop",
            f'[ "$1 $2 $3" = "-p config/file {FMRI}" ] || exit 2\necho "{conf_value}"\n',
        )
    # The stand-in daemon reports its pid and argv: same pid as the method == exec'd.
    _stub(bindir, "snapperd", 'echo "pid=$$"\nfor a in "$@"; do echo "arg=$a"; done\n')
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "SMF_FMRI": FMRI}
    proc = subprocess.Popen(
        [str(SMF / "method" / "snapperd")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=30)
    return proc, out, err


def test_method_execs_daemon_with_config(tmp_path: Path) -> None:
    conf = tmp_path / "snapperd.toml"
    conf.write_text("# test\n")
    proc, out, err = _run_method(tmp_path, str(conf))
    assert proc.returncode == 0, err
    assert out.splitlines() == [f"pid={proc.pid}", "arg=--config", f"arg={conf}"]


def test_method_missing_config_file(tmp_path: Path) -> None:
    proc, out, err = _run_method(tmp_path, str(tmp_path / "absent.toml"))
    assert proc.returncode == 96
    assert "absent.toml" in err and "does not exist" in err
    assert "pid=" not in out


def test_method_property_unset(tmp_path: Path) -> None:
    proc, out, err = _run_method(tmp_path, None)
    assert proc.returncode == 96
    assert "config/file is not set" in err
    assert "pid=" not in out


# --- the agent's method: a policy file, or a policy of the registry by name

AGENT_FMRI = "svc:/smartdc/agent/snapper-agent:default"


def _run_agent_method(tmp_path: Path, props: dict[str, str]) -> tuple[int, list[str], str]:
    bindir = tmp_path / "bin"
    bindir.mkdir(parents=True)
    cases = "".join(f'  "-p config/{k} {AGENT_FMRI}") echo \'{v}\' ;;\n'
                    for k, v in props.items())
    _stub(bindir, "svcprop", f'case "$1 $2 $3" in\n{cases}'
                             '  *) echo "svcprop: Couldn\'t find property." >&2; exit 1 ;;\n'
                             "esac\n")
    _stub(bindir, "snapper", 'for a in "$@"; do echo "arg=$a"; done\n')
    res = subprocess.run([str(SMF / "method" / "snapper-agent")], capture_output=True,
                         text=True, timeout=30, check=False,
                         env={"PATH": f"{bindir}:/usr/bin:/bin", "SMF_FMRI": AGENT_FMRI})
    return res.returncode, [a[4:] for a in res.stdout.splitlines()], res.stderr


def test_agent_method_runs_a_policy_file_or_a_registry_policy(tmp_path: Path) -> None:
    conf, policy = tmp_path / "cn.toml", tmp_path / "policy.toml"
    conf.write_text("# test\n")
    policy.write_text("# test\n")
    base = {"file": str(conf), "policy": str(policy), "state": "/var/tmp/state.json"}
    rc, argv, err = _run_agent_method(tmp_path / "a", {**base, "policy_name": '""'})
    assert rc == 0, err
    assert argv == ["--config", str(conf), "agent", "--policy", str(policy),
                    "--state", "/var/tmp/state.json"]
    rc, argv, err = _run_agent_method(tmp_path / "b", {**base, "policy_name": "gold",
                                                       "policy": str(tmp_path / "none")})
    assert rc == 0, err  # the file is not needed when the registry's policy is named
    assert argv == ["--config", str(conf), "agent", "--policy-from-coordinator", "gold",
                    "--state", "/var/tmp/state.json"]
    rc, argv, err = _run_agent_method(tmp_path / "c", {**base, "policy": str(tmp_path / "x")})
    assert rc == 96 and argv == [] and "config/policy" in err and "not readable" in err
    rc, argv, err = _run_agent_method(tmp_path / "d", {"file": str(conf), "state": "s"})
    assert rc == 96 and argv == [] and "config/policy_name" in err
