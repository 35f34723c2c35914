"""Settings: clear errors for bad values, and docs that match the code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from gpu_dispatch_tools.cli import config_reference

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_doc_lists_every_setting_as_celeryconfig_declares_it():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    generated = re.search(r"<!-- generated: .*? -->\n(.*)<!-- end generated -->", doc, re.S).group(1)
    assert generated.strip() == config_reference().strip(), \
        "docs/configuration.md is stale: paste the output of `gpu-dispatch config --markdown`"


def test_a_bad_setting_stops_start_up_with_a_message_naming_the_variable():
    env = {**os.environ, "GPU_DISPATCH_REFRESH_INTERVAL": "soon"}
    done = subprocess.run([sys.executable, "-c", "import celeryconfig"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert "GPU_DISPATCH_REFRESH_INTERVAL='soon' is not valid" in done.stderr


def test_a_choice_setting_lists_the_allowed_values():
    env = {**os.environ, "GPU_DISPATCH_BACKEND": "torch"}
    done = subprocess.run([sys.executable, "-c", "import celeryconfig"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert "expected one of openai, python, simulated" in done.stderr


def test_metadata_doc_lists_every_key_as_the_contract_declares_it():
    from gpu_dispatch_tools.cli import metadata_reference

    doc = (ROOT / "docs" / "metadata.md").read_text()
    generated = re.search(r"<!-- generated: .*? -->\n(.*)<!-- end generated -->", doc, re.S).group(1)
    assert generated.strip() == metadata_reference().strip(), \
        "docs/metadata.md is stale: paste the output of `gpu-dispatch config --metadata`"
