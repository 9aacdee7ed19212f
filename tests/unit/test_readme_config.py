"""The README's config example is a config aioproxy accepts, with every key it shows."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from aioproxy.config import parse_config

README = Path(__file__).parents[2] / "README.md"


def test_readme_config_example_parses() -> None:
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    example = next(block for block in blocks if "[router]" in block)
    config = parse_config(tomllib.loads(example), "README.md", env={"AIOPROXY_MASTER_KEY": "sk-x"})
    assert config.auth.master_key == "sk-x"
    assert config.router.fallbacks == {"gpt-test": ["gpt-backup"]}
    assert config.router.models["gpt-test"].strategy == "latency"
    assert config.server.keepalive_interval == 15
    assert config.aliases == {"chat_completions": ["/openai/v1/chat/completions"]}
