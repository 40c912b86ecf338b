"""Both catalogs are complete and agree; every error and command has its message."""

from __future__ import annotations

import pytest

from bot import errors
from bot.i18n import CATALOGS, normalize_lang, placeholders, t
from plugins.registry import COMMANDS


def test_catalogs_have_the_same_keys() -> None:
    en, zh = CATALOGS["en"], CATALOGS["zh"]
    assert set(en) - set(zh) == set()
    assert set(zh) - set(en) == set()


@pytest.mark.parametrize("key", sorted(CATALOGS["en"]))
def test_placeholders_agree_between_languages(key: str) -> None:
    assert placeholders(CATALOGS["en"][key]) == placeholders(CATALOGS["zh"][key])


@pytest.mark.parametrize("cls", errors.ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_error_has_a_message_in_both_languages(cls: type[errors.DrawbridgeError]) -> None:
    for catalog in CATALOGS.values():
        assert cls.key in catalog


def test_every_command_and_option_has_help() -> None:
    for spec in COMMANDS:
        for catalog in CATALOGS.values():
            assert spec.help_key in catalog
            for option in spec.options:
                assert option.help_key in catalog
            if spec.text_arg:
                assert f"arg.{spec.text_arg}" in catalog


def test_chinese_messages_are_chinese() -> None:
    assert t("zh", "error.moderation") != t("en", "error.moderation")
    assert "审核" in t("zh", "error.moderation")


def test_missing_parameters_do_not_crash() -> None:
    assert "{size}" in t("en", "error.invalid_size")


@pytest.mark.parametrize(
    ("locale", "lang"),
    [("zh-CN", "zh"), ("zh_TW", "zh"), ("en-US", "en"), ("ru", "en"), (None, "zh"), ("", "zh")],
)
def test_platform_locales_map_to_catalogs(locale: str | None, lang: str) -> None:
    assert normalize_lang(locale) == lang
