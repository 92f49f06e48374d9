"""Lab profiles: the shipped ones load and fit their sites; bad ones fail with one precise line."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from labctl import sites
from labctl.errors import ProfileError, UserError
from labctl.profile import (
    Output,
    Port,
    Profile,
    available_profiles,
    find_profile,
    json_schema,
    load_profile,
    shipped_profiles_dir,
)
from labctl.site_fit import require_valid_for_site, validate_for_site

BAD = Path(__file__).parent / "data" / "bad_profiles"
SHIPPED = sorted(p.stem for p in shipped_profiles_dir().glob("*.yaml"))


def _profile(**changes: object) -> Profile:
    data: dict[str, object] = {
        "name": "lab",
        "sites": ["chi@tacc", "chi@uc"],
        "lease_hours": 3,
        "image": "ubuntu-24.04-cuda",
        "nodes": {
            "gpu": {
                "gpu": {"model": "A100"},
                "floating_ip": True,
                "types": {"chi@tacc": ["compute_liqid"], "chi@uc": ["gpu_a100_pcie", "compute_gigaio"]},
            }
        },
    }
    data.update(changes)
    return Profile.model_validate(data)


def _write(root: Path, name: str, text: str) -> Path:
    path = root / "profiles" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


# ------------------------------------------------------------------------------------ shipped


def test_the_course_profiles_are_shipped() -> None:
    assert {"hello", "gpu-a100"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads_and_fits_each_of_its_sites(name: str) -> None:
    profile = load_profile(find_profile(name))
    assert profile.name == name
    assert profile.lab_dir.name == name
    for site_name in profile.sites:
        assert validate_for_site(profile, sites.resolve(site_name)) == [], site_name
        assert validate_for_site(profile, sites.resolve(f"sim:{site_name}")) == [], site_name
    assert validate_for_site(profile, sites.resolve("sim", profile)) == []
    assert any(step.safe_on_sim for step in profile.setup)
    assert any(not step.safe_on_sim for step in profile.setup)


def test_hello_profile() -> None:
    p = load_profile(find_profile("hello"))
    assert p.sites == ["kvm@tacc", "aws", "gcp"]
    assert p.types_for("node", "kvm@tacc", "kvm") == ["m1.small", "m1.medium"]
    assert p.node_names() == [("node-1", "node")]
    assert p.lease_hours == 6
    assert [r.port for r in p.port_rules()] == [22]
    assert (p.lab_dir / "hello.sh").is_file()
    assert "ssh" in [o.name for o in p.outputs]


def test_gpu_a100_profile() -> None:
    p = load_profile(find_profile("gpu-a100"))
    assert p.types_for("gpu", "chi@uc", "chi") == ["gpu_a100_pcie", "compute_gigaio"]
    assert p.types_for("gpu", "chi@tacc", "chi") == ["compute_liqid"]
    assert p.image_for("gpu") == "ubuntu-24.04-cuda"
    assert [(r.port, r.protocol) for r in p.port_rules()] == [(22, "tcp"), (8888, "tcp")]
    jupyter = next(o for o in p.outputs if o.name == "jupyter")
    assert jupyter.forward == 8888
    assert jupyter.render({"gpu-1": {"floating_ip": "129.114.1.2"}}) == "http://129.114.1.2:8888"


def test_yaml_on_key_is_not_a_boolean(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "lab",
        """\
        name: lab
        sites: [kvm@tacc]
        lease_hours: 1
        image: ubuntu-24.04
        nodes: {vm: {types: {kvm: [m1.small]}, floating_ip: yes}}
        setup:
          - {name: a, on: vm-1, run: "true"}
        """,
    )
    p = load_profile(path)
    assert p.setup[0].on == "vm-1"
    assert p.nodes["vm"].floating_ip is True


# -------------------------------------------------------------------------------- bad profiles

LOAD_ERRORS = [
    ("unknown_key", ["nodes.gpu.floating_ips", "unknown field", "did you mean 'floating_ip'"]),
    ("wrong_type", ["nodes.gpu.count", "valid integer", "'many'"]),
    ("missing_nodes", ["nodes", "Field required"]),
    ("empty_nodes", ["nodes", "at least 1 item"]),
    ("yaml_syntax", ["yaml_syntax.yaml:7:", "YAML syntax error", "mapping values are not allowed"]),
    ("unknown_target", ["setup[0].on[1]", "unknown target 'gpu-3'", "did you mean 'gpu-1'"]),
    ("missing_script", ["setup[0].script", "'install.sh' not found", "labs/missing_script"]),
    ("name_mismatch", ["name:", "'some-other-name'", "'name_mismatch'"]),
    ("empty", ["empty file"]),
    ("comments_only", ["empty file"]),
    ("not_mapping", ["top level must be a mapping", "not a list"]),
    ("bad_output", ["outputs[0].value", "unknown node 'gpu-2'"]),
    ("bad_cidr", ["ports[1].cidr", "host bits", "10.0.0.0/24"]),
    ("run_and_script", ["setup[0]", "exactly one of 'run'"]),
    ("bad_role", ["nodes.GPU_nodes", "role names"]),
    ("duplicate_key", ["duplicate_key.yaml:13:1", "duplicate key 'lease_hours'"]),
]

SITE_ERRORS = [
    (
        "unknown_type",
        "chi@uc",
        [
            "nodes.gpu.types.chi@uc[1]",
            "unknown node type 'gpu_a100' at chi@uc",
            "known GPU types:",
            "gpu_a100_pcie",
        ],
    ),
    ("gpu_on_cpu", "chi@tacc", ["nodes.gpu.types.chi@tacc[0]", "compute_skylake has no GPU", "A100"]),
]


def _assert_one_line(err: ProfileError, stem: str, fragments: list[str]) -> None:
    message = str(err)
    assert "\n" not in message and message == message.strip()
    assert f"{stem}.yaml" in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize(("stem", "fragments"), LOAD_ERRORS, ids=[s for s, _ in LOAD_ERRORS])
def test_bad_profile_fails_to_load_with_one_line(stem: str, fragments: list[str]) -> None:
    with pytest.raises(ProfileError) as info:
        load_profile(BAD / f"{stem}.yaml")
    assert isinstance(info.value, UserError)
    _assert_one_line(info.value, stem, fragments)


@pytest.mark.parametrize(("stem", "site", "fragments"), SITE_ERRORS, ids=[s for s, _, _ in SITE_ERRORS])
def test_bad_profile_fails_for_its_site_with_one_line(stem: str, site: str, fragments: list[str]) -> None:
    profile = load_profile(BAD / f"{stem}.yaml")
    with pytest.raises(ProfileError) as info:
        require_valid_for_site(profile, sites.resolve(site))
    _assert_one_line(info.value, stem, fragments)


def test_missing_file() -> None:
    with pytest.raises(ProfileError, match=r"nope\.yaml: no such file"):
        load_profile(BAD / "nope.yaml")


def test_several_errors_give_the_first_and_a_count(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "lab",
        """\
        name: lab
        sites: [chi@tacc]
        lease_hours: 0
        image: ubuntu-24.04
        nodes: {node: {count: 0, types: {chi: [compute_skylake]}}}
        """,
    )
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert "2 problems: lease_hours: Input should be greater than or equal to 1" in str(info.value)
    assert "; nodes.node.count: " in str(info.value) and "more)" not in str(info.value)


def test_paths_are_shown_relative_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(
        tmp_path,
        "gpu",
        "name: gpu\nsites: [chi@tacc]\nlease_hours: 3\nimage: x\n"
        "nodes: {gpu: {count: 0, types: {chi: [a]}}}\n",
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert (
        str(info.value)
        == "profiles/gpu.yaml: nodes.gpu.count: Input should be greater than or equal to 1 (got 0)"
    )


# ------------------------------------------------------------------------- lab dir and lookup


def test_lab_dir_scripts_and_uploads(tmp_path: Path) -> None:
    lab = tmp_path / "labs" / "mylab"
    (lab / "files").mkdir(parents=True)
    (lab / "setup.sh").write_text("echo hi\n")
    (lab / "files" / "app.py").write_text("print(1)\n")
    text = """\
        name: mylab
        sites: [kvm@tacc]
        lease_hours: 2
        image: ubuntu-24.04
        nodes: {vm: {count: 2, types: {kvm@tacc: [m1.medium]}}}
        setup:
          - {name: one, on: [vm-1, vm-2], script: setup.sh, upload: [{src: files/app.py, dest: app.py}]}
        """
    profile = load_profile(_write(tmp_path, "mylab", text))
    assert profile.lab_dir == lab
    assert profile.node_names() == [("vm-1", "vm"), ("vm-2", "vm")]

    escaping = text.replace("files/app.py", "../../profiles/mylab.yaml")
    with pytest.raises(ProfileError, match=r"setup\[0\]\.upload\[0\]\.src: .* outside the lab directory"):
        load_profile(_write(tmp_path, "mylab", escaping))


def test_find_profile_prefers_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert find_profile("hello") == shipped_profiles_dir() / "hello.yaml"
    local = _write(tmp_path, "hello", "name: hello\n")
    assert find_profile("hello").resolve() == local.resolve()
    assert find_profile(str(local)) == local
    assert "hello" in available_profiles()
    with pytest.raises(ProfileError, match=r"no profile named 'helo'.*did you mean 'hello'"):
        find_profile("helo")
    with pytest.raises(ProfileError, match="no such file"):
        find_profile("profiles/missing.yaml")


# ------------------------------------------------------------------------------------ methods


def test_types_for_prefers_the_exact_site() -> None:
    p = _profile(
        sites=["chi@tacc", "chi@uc"],
        nodes={"n": {"types": {"chi": ["compute_skylake"], "chi@uc": ["compute_cascadelake_r"]}}},
    )
    assert p.types_for("n", "chi@uc", "chi") == ["compute_cascadelake_r"]
    assert p.types_for("n", "chi@tacc", "chi") == ["compute_skylake"]
    assert p.types_for("n", "kvm@tacc", "kvm") == []


def test_image_override_and_port_rules() -> None:
    p = _profile(
        nodes={
            "gpu": {"gpu": {"model": "A100"}, "types": {"chi": ["compute_liqid"]}},
            "cpu": {"image": "ubuntu-24.04", "types": {"chi": ["compute_skylake"]}},
        },
        ports=[8888, {"port": 22}, {"port": 53, "protocol": "udp", "cidr": "10.0.0.0/8"}],
    )
    assert p.image_for("gpu") == "ubuntu-24.04-cuda"
    assert p.image_for("cpu") == "ubuntu-24.04"
    assert p.port_rules() == [
        Port(port=22),
        Port(port=8888),
        Port(port=53, protocol="udp", cidr="10.0.0.0/8"),
    ]


def test_output_placeholders_need_a_floating_ip() -> None:
    with pytest.raises(ValueError, match=r"outputs\[0\]\.value: .*gpu-1 has no floating IP"):
        _profile(
            nodes={"gpu": {"types": {"chi": ["compute_liqid"]}}},
            outputs=[{"name": "x", "value": "{gpu-1.floating_ip}"}],
        )
    with pytest.raises(ValueError, match="unknown attribute 'ip'"):
        _profile(outputs=[{"name": "x", "value": "{gpu-1.ip}"}])
    out = Output(name="x", value="{{literal}} {gpu-1.fixed_ip}")
    assert out.render({"gpu-1": {"fixed_ip": "10.0.0.5"}}) == "{literal} 10.0.0.5"
    _profile(outputs=[{"name": "x", "value": "{{not a placeholder}} {gpu-1.fixed_ip}"}])


def test_types_keys_must_be_sites_or_families() -> None:
    with pytest.raises(ValueError, match=r"nodes\.gpu\.types\.chi@tac: .*did you mean 'chi@tacc'"):
        _profile(nodes={"gpu": {"types": {"chi@tac": ["compute_liqid"]}}})


# -------------------------------------------------------------------------------- site checks


def test_site_problems() -> None:
    p = _profile()
    assert validate_for_site(p, sites.resolve("chi@edge")) == [
        "sites: not supported at this site: chi@edge leases devices (containers), not servers"
    ]
    problems = validate_for_site(p, sites.resolve("kvm@tacc"))
    assert problems[0].startswith("sites: kvm@tacc is not one of this profile's sites")
    assert problems[1] == "nodes.gpu.types: no node types for kvm@tacc (add a 'kvm@tacc' or 'kvm' key)"

    two = _profile(nodes={"gpu": {"gpu": {"model": "A100", "count": 2}, "types": {"chi": ["compute_liqid"]}}})
    assert validate_for_site(two, sites.resolve("chi@tacc")) == [
        "nodes.gpu.types.chi[0]: compute_liqid has 1 GPU(s), but nodes.gpu.gpu asks for 2"
    ]
    wrong_model = _profile(nodes={"gpu": {"gpu": {"model": "H100"}, "types": {"chi": ["compute_liqid"]}}})
    assert (
        "has GA100 [A100 PCIe 40GB] GPUs, but nodes.gpu.gpu asks for H100"
        in validate_for_site(wrong_model, sites.resolve("chi@tacc"))[0]
    )

    image = _profile(image="ubuntu-20.04")
    [problem] = validate_for_site(image, sites.resolve("chi@tacc"))
    assert problem.startswith(
        "image: unknown image 'ubuntu-20.04' at chi@tacc (known: ubuntu-24.04, ubuntu-24.04-cuda, "
        "ubuntu-24.04-rocm, ubuntu-22.04, ubuntu-22.04-cuda) (did you mean"
    )
    assert validate_for_site(_profile(image="CC-Ubuntu24.04-CUDA"), sites.resolve("chi@tacc")) == []


def test_kvm_flavors_are_checked() -> None:
    p = _profile(
        sites=["kvm@tacc"],
        image="ubuntu-24.04",
        nodes={
            "vm": {"types": {"kvm": ["m1.smal"]}},
            "gpu": {"gpu": {"model": "H100"}, "types": {"kvm": ["m1.large"]}},
        },
    )
    problems = validate_for_site(p, sites.resolve("sim:kvm@tacc"))
    assert problems[0].startswith(
        "nodes.vm.types.kvm[0]: unknown flavor 'm1.smal' at kvm@tacc (known flavors:"
    )
    assert problems[0].endswith("(did you mean 'm1.small'?)")
    assert problems[1] == "nodes.gpu.types.kvm[0]: m1.large has no GPU, but nodes.gpu.gpu asks for 1x H100"


# ------------------------------------------------------------------------------------- schema


def test_json_schema() -> None:
    schema = json_schema()
    json.dumps(schema)
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) >= {"name", "sites", "lease_hours", "image", "nodes"}
    for name, prop in schema["properties"].items():
        assert prop.get("description") and prop.get("title"), name
    group = schema["$defs"]["NodeGroup"]["properties"]
    assert "floating_ip" in group and group["types"]["description"]
    nodes = schema["properties"]["nodes"]
    assert list(nodes["patternProperties"]) == ["^[a-z][a-z0-9-]{0,15}$"]
    assert nodes["additionalProperties"] is False
