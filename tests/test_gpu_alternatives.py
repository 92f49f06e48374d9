"""A lab that runs on A100 may accept other GPU models as fallbacks on the commercial clouds, if it says so."""

from __future__ import annotations

import pytest

from labctl import hardware, sites
from labctl.errors import ProfileError
from labctl.profile import load_profile
from labctl.site_fit import require_valid_for_site

PROFILE = """\
name: gpulab
sites: [aws, gcp]
lease_hours: 2
image: ubuntu-24.04-cuda
nodes:
  gpu:
    gpu: {{model: A100{alternatives}}}
    floating_ip: true
{types}
"""


def write(tmp_path, alternatives: str = "", types: str = ""):
    (tmp_path / "profiles").mkdir(exist_ok=True)
    path = tmp_path / "profiles" / "gpulab.yaml"
    path.write_text(PROFILE.format(alternatives=alternatives, types=types))
    return load_profile(path)


def test_an_a10g_type_is_refused_for_an_a100_lab(tmp_path):
    prof = write(tmp_path, types="    types: {aws: [p4d.24xlarge, g5.xlarge]}")
    with pytest.raises(ProfileError, match=r"types\.aws\[1\].*A10G.*asks for A100") as err:
        require_valid_for_site(prof, sites.resolve("aws:us-east-1"))
    assert "\n" not in str(err.value)


def test_declared_alternatives_allow_fallback_types(tmp_path):
    prof = write(tmp_path, alternatives=", alternatives: [A10G, L4]",
                 types="    types: {aws: [p4d.24xlarge, g5.xlarge], gcp: [a2-highgpu-1g, g2-standard-4]}")
    require_valid_for_site(prof, sites.resolve("aws:us-east-1"))
    require_valid_for_site(prof, sites.resolve("gcp:us-central1-a"))


def test_defaults_follow_the_models_in_order(tmp_path):
    assert hardware.default_types("aws", ["A100"]) == ("p4d.24xlarge",)
    assert hardware.default_types("aws", ["A100", "A10G", "L4"]) == ("p4d.24xlarge", "g5.xlarge", "g6.xlarge")
    # No aws types named: labctl's defaults for A100 then L4 are used, and they must validate.
    prof = write(tmp_path, alternatives=", alternatives: [L4]", types="    types: {gcp: [g2-standard-4]}")
    require_valid_for_site(prof, sites.resolve("aws:us-east-1"))
