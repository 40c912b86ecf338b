"""Settings: names, defaults, .env.example, providers."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from bot.config import ProviderConfig, Settings, settings_error_lines

ROOT = Path(__file__).resolve().parent.parent


def documented_names() -> set[str]:
    text = (ROOT / ".env.example").read_text()
    return set(re.findall(r"^#?\s?([A-Z][A-Z0-9_]+)=", text, re.M))


def test_every_setting_is_in_env_example() -> None:
    names = {
        str(field.validation_alias.choices[0])  # type: ignore[union-attr]
        for field in Settings.model_fields.values()
    }
    assert names - documented_names() == set()


def env_example_required() -> set[str]:
    """Settings whose comment in .env.example starts with "Required"."""
    required = set()
    comment: list[str] = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        setting = re.match(r"^([A-Z][A-Z0-9_]+)=", line)
        if setting and comment and comment[0].startswith("Required"):
            required.add(setting.group(1))
        if line.startswith("#") and not line.startswith("# ---"):  # not a section header
            comment.append(line.lstrip("# "))
        else:
            comment = []
    return required


def readme_required() -> set[str]:
    """The settings README's "Required settings:" paragraph names."""
    text = (ROOT / "README.md").read_text()
    found = re.search(r"^Required settings: (.*?)\n\n", text, re.M | re.S)
    assert found, 'README.md has no "Required settings:" paragraph'
    return {name.split("=")[0] for name in re.findall(r"`([A-Z][A-Z0-9_]+(?:=\w+)?)`", found[1])}


def test_readme_and_env_example_agree_on_the_required_settings() -> None:
    required = {
        "DRAWBRIDGE_API_BASE",
        "DRAWBRIDGE_PROVIDERS",
        "TELEGRAM_BOT_TOKEN",
        "QQ_ENABLED",
        "DISCORD_BOT_TOKEN",
    }
    assert readme_required() == required
    assert env_example_required() == required
    # The summary at the top of .env.example names the same ones.
    head = (ROOT / ".env.example").read_text().split("\n\n", 1)[0]
    summary = re.search(r"# Required(.*?)Everything else", head, re.S)
    assert summary is not None
    assert set(re.findall(r"[A-Z][A-Z0-9_]{5,}", summary[1])) == required


def test_env_example_loads_as_a_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.model == "gpt-image-2"
    # No provider until the operator names one: not the mock upstream's address.
    assert settings.api_base == ""
    assert settings.providers() == []
    assert settings.enabled_platforms() == []
    assert settings.admin_ids() == set()  # nobody is an admin until the operator says so


@pytest.mark.parametrize(
    "base", ["https://relay.example", "https://relay.example/v1", "https://relay.example/v1/"]
)
def test_api_base_with_or_without_v1(base: str) -> None:
    settings = Settings(_env_file=None, api_base=base, api_key="sk-x")
    assert settings.providers()[0].api_base == "https://relay.example"


def test_providers_are_tried_in_order_and_inherit_defaults() -> None:
    settings = Settings(
        _env_file=None,
        model="gpt-image-2",
        stream=False,
        providers_json=[
            {
                "name": "url-group",
                "api_base": "https://a.example/v1",
                "api_key": "sk-a",
                "max_references": 9,
            },
            {
                "name": "b64-group",
                "api_base": "https://a.example",
                "api_key": "sk-b",
                "stream": True,
            },
        ],
    )
    first, second = settings.providers()
    assert (first.name, first.max_references, first.stream) == ("url-group", 9, False)
    assert (second.name, second.stream, second.model) == ("b64-group", True, "gpt-image-2")


def test_environment_names_are_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRAWBRIDGE_API_BASE", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("DRAWBRIDGE_API_KEY", "sk-env")
    monkeypatch.setenv("DRAWBRIDGE_MODEL", "gpt-image-1")
    monkeypatch.setenv("DRAWBRIDGE_DATA_DIR", "/tmp/db-test")
    monkeypatch.setenv("DRAWBRIDGE_STREAM", "false")
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", "1:x")
    monkeypatch.setenv("QQ_ENABLED", "true")
    monkeypatch.setenv("DISCORD_BOT_TOKEN", "d")
    settings = Settings(_env_file=None)
    provider = settings.providers()[0]
    assert (provider.api_base, provider.api_key, provider.model, provider.stream) == (
        "http://127.0.0.1:9",
        "sk-env",
        "gpt-image-1",
        False,
    )
    assert str(settings.data_dir) == "/tmp/db-test"
    assert settings.enabled_platforms() == ["telegram", "qq", "discord"]


def test_base_url_is_accepted_as_api_base_in_a_provider_entry() -> None:
    # The openai SDK's name; merged naively, the inherited DRAWBRIDGE_API_BASE would win.
    settings = Settings(
        _env_file=None,
        api_base="https://global.example",
        api_key="sk-x",
        providers_json=[{"name": "sdk-style", "base_url": "https://relay.example/v1"}],
    )
    [provider] = settings.providers()
    assert provider.api_base == "https://relay.example"
    assert ProviderConfig(base_url="https://b.example/v1").api_base == "https://b.example"  # type: ignore[call-arg]


def test_a_provider_entry_with_both_api_base_and_base_url_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(
            _env_file=None,
            providers_json=[{"api_base": "https://a.example", "base_url": "https://b.example"}],
        )
    [line] = settings_error_lines(caught.value)
    assert line.startswith("DRAWBRIDGE_PROVIDERS[0]: ") and "not both" in line


def test_unknown_provider_fields_are_refused_not_ignored() -> None:
    with pytest.raises(ValidationError):
        ProviderConfig(api_base="https://a.example", max_refs=3)  # type: ignore[call-arg]
    with pytest.raises(ValidationError) as caught:
        Settings(
            _env_file=None,
            providers_json=[{"api_base": "https://a.example", "partial_image": 3}],
        )
    [line] = settings_error_lines(caught.value)
    assert line.startswith("DRAWBRIDGE_PROVIDERS[0].partial_image: unknown field")
    assert "partial_images" in line  # the accepted names are listed


def test_provider_entries_are_checked_when_settings_load_not_when_used() -> None:
    # Before, a bad entry loaded fine and raised inside the first command needing providers.
    with pytest.raises(ValidationError) as caught:
        Settings(
            _env_file=None,
            providers_json=[
                {"api_base": "https://a.example", "max_references": 99},
                {"api_base": "https://b.example", "concurrency": 0},
            ],
        )
    lines = settings_error_lines(caught.value)
    assert [line.split(":")[0] for line in lines] == [
        "DRAWBRIDGE_PROVIDERS[0].max_references",
        "DRAWBRIDGE_PROVIDERS[1].concurrency",
    ]


@pytest.mark.parametrize(
    ("admins", "pairs"),
    [
        ("", set()),
        ("telegram:1, QQ:2 ,discord:3", {("telegram", "1"), ("qq", "2"), ("discord", "3")}),
    ],
)
def test_admins_in_platform_form_are_read(admins: str, pairs: set[tuple[str, str]]) -> None:
    assert Settings(_env_file=None, admins=admins).admin_ids() == pairs


@pytest.mark.parametrize("admins", ["123456", "telegram:", ":123", "telegram:1,987"])
def test_admins_without_a_platform_are_refused(admins: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, admins=admins)
    [line] = settings_error_lines(caught.value)
    assert line.startswith("DRAWBRIDGE_ADMINS: ") and "platform:user_id" in line
