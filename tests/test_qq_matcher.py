"""The QQ matcher and chat under nonebug: real handler, real services, mock upstream.

nonebug fakes the OneBot connection: every API call the bot makes must be announced with
`should_call_api`, in order, and gets the answer given there. Events are built the way the
OneBot adapter leaves them after its own processing (`reply=` filled in, @-mention stripped),
since `nonebot.message.handle_event` skips the adapter's reply lookup.
"""

from __future__ import annotations

import base64
import io
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import date
from typing import Any

import pytest
from loguru import logger
from nonebot.adapters.onebot.v11 import (
    ActionFailed,
    Bot,
    GroupMessageEvent,
    Message,
    MessageSegment,
    NetworkError,
    PrivateMessageEvent,
)
from nonebot.adapters.onebot.v11.event import Reply, Sender
from nonebot.matcher import Matcher
from nonebot.message import handle_event
from nonebug import App
from PIL import Image

from adapters.qq import create_platform
from adapters.qq.chat import QQChat, SendPacer
from adapters.qq.handler import build_matcher
from bot.chat import ChatLimits, OutFile, ResultMeta
from bot.errors import DeliveryError
from bot.i18n import t
from bot.mock_upstream import MockUpstream
from bot.services import Services
from tests.fake_onebot import ImageHost, png

SELF_ID = 10001
GROUP = 30001
USER = 20001
_message_ids = itertools.count(100)


class Matching:
    """Equal to any value `check` accepts; remembers what it was compared with."""

    def __init__(self, check: Callable[[Any], bool] = lambda _: True) -> None:
        self.check = check
        self.seen: list[Any] = []
        self.at: list[float] = []

    def __eq__(self, other: object) -> bool:
        self.seen.append(other)
        self.at.append(time.monotonic())
        return self.check(other)

    __hash__ = None  # type: ignore[assignment]


def segments(message: Any, kind: str) -> list[MessageSegment]:
    return [s for s in Message(message) if s.type == kind]


def plain(message: Any) -> str:
    return Message(message).extract_plain_text()


def image_bytes(message: Any) -> list[bytes]:
    return [
        base64.b64decode(s.data["file"].removeprefix("base64://"))
        for s in segments(message, "image")
    ]


def replies_with_image(to: int) -> Callable[[Any], bool]:
    def check(message: Any) -> bool:
        reply = segments(message, "reply")
        return bool(reply) and reply[0].data["id"] == str(to) and len(image_bytes(message)) == 1

    return check


def replies_with_text(to: int, text: str) -> Callable[[Any], bool]:
    def check(message: Any) -> bool:
        reply = segments(message, "reply")
        return bool(reply) and reply[0].data["id"] == str(to) and plain(message) == text

    return check


def group_event(
    parts: list[MessageSegment] | str,
    *,
    user_id: int = USER,
    reply: Reply | None = None,
    to_me: bool = False,
) -> GroupMessageEvent:
    message = Message(parts)
    return GroupMessageEvent(
        time=int(time.time()),
        self_id=SELF_ID,
        post_type="message",
        sub_type="normal",
        user_id=user_id,
        message_type="group",
        message_id=next(_message_ids),
        message=message,
        original_message=message,
        raw_message=str(message),
        font=0,
        sender=Sender(user_id=user_id, nickname="tester", card="Alice"),
        to_me=to_me,
        reply=reply,
        group_id=GROUP,
    )


def private_event(text: str, *, user_id: int = USER) -> PrivateMessageEvent:
    message = Message(text)
    return PrivateMessageEvent(
        time=int(time.time()),
        self_id=SELF_ID,
        post_type="message",
        sub_type="friend",
        user_id=user_id,
        message_type="private",
        message_id=next(_message_ids),
        message=message,
        original_message=message,
        raw_message=text,
        font=0,
        sender=Sender(user_id=user_id, nickname="tester"),
        to_me=True,
    )


def quoted(message_id: int, parts: list[MessageSegment], sender: int = USER + 1) -> Reply:
    return Reply(
        time=int(time.time()),
        message_type="group",
        message_id=message_id,
        real_id=message_id,
        sender=Sender(user_id=sender, nickname="someone"),
        message=Message(parts),
    )


def to_group(message: Matching) -> dict[str, Any]:
    return {"message_type": "group", "group_id": GROUP, "message": message}


@pytest.fixture
async def images() -> AsyncIterator[ImageHost]:
    host = ImageHost()
    await host.start()
    try:
        yield host
    finally:
        await host.stop()


@pytest.fixture
async def qq_services(settings_factory: Callable[..., Any]) -> AsyncIterator[Services]:
    # The test image host is 127.0.0.1, listed explicitly as the operator of a local NapCat would.
    services = await Services.create(settings_factory(image_hosts="127.0.0.1"))
    try:
        yield services
    finally:
        await services.close()


@pytest.fixture
def matcher(qq_services: Services, app: App) -> Iterator[type[Matcher]]:
    # Built the way `drawbridge run` does, so the log redaction is installed as in production.
    platform = create_platform(qq_services.settings, qq_services)
    platform.handler.pacer = SendPacer(0.0)
    registered = build_matcher(platform.handler)
    try:
        yield registered
    finally:
        registered.destroy()


@pytest.fixture
def trace_log() -> Iterator[list[str]]:
    """Everything loguru writes, at every level, formatted with message and exception."""
    lines: list[str] = []
    sink = logger.add(
        lambda m: lines.append(str(m)), level="TRACE", format="{message}\n{exception}"
    )
    try:
        yield lines
    finally:
        logger.remove(sink)


async def test_commands_match_with_or_without_mention_and_by_chinese_alias(
    app: App, matcher: type[Matcher]
) -> None:
    help_en = Matching(lambda m: plain(m).startswith(t("en", "help.header", model="gpt-image-2")))
    async with app.test_matcher(matcher) as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF_ID))
        for event in (
            group_event("/help"),
            group_event("/帮助", to_me=True),
            group_event("／帮助"),
            private_event("/help"),
        ):
            ctx.receive_event(bot, event)
            ctx.should_pass_rule(matcher)
            target = (
                to_group(help_en)
                if isinstance(event, GroupMessageEvent)
                else {"message_type": "private", "user_id": USER, "message": help_en}
            )
            ctx.should_call_api("send_msg", target, {"message_id": 1})
        for event in (
            group_event("help me draw a cat"),
            group_event("please /help"),
            group_event("/unknowncommand x"),
        ):
            ctx.receive_event(bot, event)
            ctx.should_not_pass_rule(matcher)
    assert len(help_en.seen) == 4


async def test_token_in_group_is_recalled_and_the_key_never_reaches_any_log(
    app: App,
    matcher: type[Matcher],
    trace_log: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    keys = ("sk-live-9f8e7d6c5b4a3210fedcba", "nKq83jdPq0aZx72LmR5s")
    events = (group_event(f"/token {keys[0]}"), group_event(f"/令牌{keys[1]}"))
    warning = t("en", "token.group_deleted", user="Alice")
    async with app.test_matcher(matcher) as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF_ID))
        for event in events:
            ctx.receive_event(bot, event)
            ctx.should_call_api("delete_msg", {"message_id": event.message_id}, None)
            ctx.should_call_api(
                "send_msg", to_group(Matching(replies_with_text(event.message_id, warning))), {}
            )
    # nonebot logged both messages (the capture works) ...
    assert any(str(e.message_id) in line for e in events for line in trace_log)
    # ... and no line anywhere holds a key.
    everything = "\n".join(trace_log) + "\n".join(r.getMessage() for r in caplog.records)
    for key in keys:
        assert key not in everything


async def test_edit_on_a_quoted_image_downloads_it_and_replies_with_the_result(
    app: App,
    matcher: type[Matcher],
    images: ImageHost,
    qq_services: Services,
    mock_upstream: MockUpstream,
) -> None:
    url = images.add("cat.png", png(80, 60))
    event = group_event("/改图 make it blue", reply=quoted(9001, [MessageSegment.image(url)]))
    result = Matching(replies_with_image(event.message_id))
    async with app.test_api() as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF_ID))
        ack = Matching(lambda m: "job" in plain(m) and bool(segments(m, "reply")))
        ctx.should_call_api("send_msg", to_group(ack), {"message_id": 501})
        ctx.should_call_api("send_msg", to_group(result), {"message_id": 502})
        ctx.should_call_api("delete_msg", {"message_id": 501}, None)
        await handle_event(bot, event)
        await qq_services.jobs.wait_idle()

    assert images.requests == ["cat.png"]
    edit = mock_upstream.requests[-1]
    assert edit.path.endswith("/images/edits")
    assert [(f.width, f.height) for f in edit.files] == [(80, 60)]
    job_id = await qq_services.job_for_message("qq", f"group:{GROUP}", "502")
    job = await qq_services.store.job(job_id) if job_id is not None else None
    assert job is not None and job.kind == "edit"


async def test_reroll_replying_to_a_result_runs_that_job_again(
    app: App, matcher: type[Matcher], qq_services: Services, mock_upstream: MockUpstream
) -> None:
    draw = group_event("/画 a lighthouse at dusk")
    async with app.test_api() as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF_ID))
        ctx.should_call_api("send_msg", to_group(Matching()), {"message_id": 601})
        ctx.should_call_api(
            "send_msg", to_group(Matching(replies_with_image(draw.message_id))), {"message_id": 602}
        )
        ctx.should_call_api("delete_msg", {"message_id": 601}, None)
        await handle_event(bot, draw)
        await qq_services.jobs.wait_idle()

        # The result message as the adapter's get_msg shows it: sent by the bot.
        reroll = group_event("/重画", reply=quoted(602, [MessageSegment.text("x")], SELF_ID))
        ctx.should_call_api("send_msg", to_group(Matching()), {"message_id": 603})
        ctx.should_call_api(
            "send_msg",
            to_group(Matching(replies_with_image(reroll.message_id))),
            {"message_id": 604},
        )
        ctx.should_call_api("delete_msg", {"message_id": 603}, None)
        await handle_event(bot, reroll)
        await qq_services.jobs.wait_idle()

    prompts = [r.fields.get("prompt") for r in mock_upstream.requests]
    assert prompts[-2:] == ["a lighthouse at dusk", "a lighthouse at dusk"]
    first = await qq_services.job_for_message("qq", f"group:{GROUP}", "602")
    second = await qq_services.job_for_message("qq", f"group:{GROUP}", "604")
    assert first is not None and second is not None and first != second


async def test_reply_segment_without_reply_info_is_looked_up_with_get_msg(
    app: App,
    matcher: type[Matcher],
    images: ImageHost,
    qq_services: Services,
    mock_upstream: MockUpstream,
) -> None:
    url = images.add("dog.png", png(40, 40))
    event = group_event([MessageSegment.reply(9100), MessageSegment.text("/edit add a hat")])
    quoted_message = {
        "time": 1,
        "message_type": "group",
        "message_id": 9100,
        "real_id": 9100,
        "sender": {"user_id": USER + 5, "nickname": "bob"},
        "message": [{"type": "image", "data": {"file": "dog.png", "url": url}}],
    }
    async with app.test_api() as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF_ID))
        ctx.should_call_api("get_msg", {"message_id": 9100}, quoted_message)
        ctx.should_call_api("send_msg", to_group(Matching()), {"message_id": 701})
        ctx.should_call_api(
            "send_msg",
            to_group(Matching(replies_with_image(event.message_id))),
            {"message_id": 702},
        )
        ctx.should_call_api("delete_msg", {"message_id": 701}, None)
        await handle_event(bot, event)
        await qq_services.jobs.wait_idle()
    assert images.requests == ["dog.png"]
    assert [(f.width, f.height) for f in mock_upstream.requests[-1].files] == [(40, 40)]


async def test_image_on_an_unlisted_host_is_refused_without_downloading(
    app: App,
    matcher: type[Matcher],
    images: ImageHost,
    mock_upstream: MockUpstream,
) -> None:
    # Same server, but named `localhost`, which the operator did not list.
    url = images.add("evil.png", png(), host="localhost")
    event = group_event([MessageSegment.text("/edit steal"), MessageSegment.image(url)])
    refused = t("en", "error.forbidden_url")
    async with app.test_api() as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF_ID))
        ctx.should_call_api(
            "send_msg", to_group(Matching(replies_with_text(event.message_id, refused))), {}
        )
        await handle_event(bot, event)
    assert images.requests == []
    assert mock_upstream.requests == []


async def _job(services: Services) -> int:
    """A real job row for results to point at."""
    user = await services.store.user("qq", str(USER))
    return await services.store.create_job(
        user_id=user.id,
        platform="qq",
        chat_id=f"group:{GROUP}",
        group_key=f"qq:group:{GROUP}",
        kind="draw",
        prompt="x",
        options={},
        ref_count=0,
        own_key=False,
    )


def _chat(bot: Bot, services: Services, **kwargs: Any) -> QQChat:
    return QQChat(
        bot, group_event("/draw x"), services, kwargs.pop("pacer", SendPacer(0)), **kwargs
    )


async def test_failed_result_send_raises_delivery_error_without_resending(
    app: App, qq_services: Services
) -> None:
    async with app.test_api() as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF_ID))
        chat = _chat(bot, qq_services)
        # Announced once: a second attempt would fail the test as an unexpected call.
        ctx.should_call_api("send_msg", to_group(Matching()), exception=NetworkError("timeout"))
        with pytest.raises(DeliveryError):
            await chat.send_results([OutFile(png(), "a.png", "image/png", 64, 64)], ResultMeta(1))


async def test_oversized_result_goes_as_a_preview_plus_the_original_as_a_group_file(
    app: App, qq_services: Services
) -> None:
    original = png(900, 600, (10, 120, 200))
    limits = ChatLimits(photo_bytes=len(original) // 2, can_edit=False)
    preview = Matching(lambda m: len(image_bytes(m)) == 1)
    upload = Matching(lambda f: f == "base64://" + base64.b64encode(original).decode())
    async with app.test_api() as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF_ID))
        chat = _chat(bot, qq_services, limits=limits)
        ctx.should_call_api("send_msg", to_group(preview), {"message_id": 801})
        ctx.should_call_api(
            "upload_group_file", {"group_id": GROUP, "file": upload, "name": "r.png"}, None
        )
        job = await _job(qq_services)
        await chat.send_results(
            [OutFile(original, "r.png", "image/png", 900, 600)], ResultMeta(job)
        )
    sent = image_bytes(preview.seen[0])[0]
    assert len(sent) <= limits.photo_bytes
    assert Image.open(io.BytesIO(sent)).format == "JPEG"
    assert await qq_services.job_for_message("qq", f"group:{GROUP}", "801") == job


async def test_several_results_go_one_per_message_paced_apart(
    app: App, qq_services: Services
) -> None:
    sends = Matching(lambda m: len(image_bytes(m)) == 1)
    files = [OutFile(png(color=(i * 60, 0, 0)), f"{i}.png", "image/png", 64, 64) for i in range(3)]
    async with app.test_api() as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF_ID))
        chat = _chat(bot, qq_services, pacer=SendPacer(0.25))
        for message_id in (901, 902, 903):
            ctx.should_call_api("send_msg", to_group(sends), {"message_id": message_id})
        job = await _job(qq_services)
        await chat.send_results(files, ResultMeta(job, caption="a caption"))
    assert [image_bytes(m)[0] for m in sends.seen] == [f.data for f in files]
    assert "a caption" in plain(sends.seen[0])
    gaps = [b - a for a, b in itertools.pairwise(sends.at)]
    assert all(gap >= 0.24 for gap in gaps), gaps
    for sent in ("901", "902", "903"):
        assert await qq_services.job_for_message("qq", f"group:{GROUP}", sent) == job


async def test_grant_names_the_target_by_at_mention(
    app: App, matcher: type[Matcher], qq_services: Services
) -> None:
    admin = await qq_services.store.user("qq", str(USER))
    await qq_services.store.set_role(admin.id, "admin")
    target = await qq_services.store.user("qq", "55555", "Bob")
    granted = Matching(lambda m: "55555" in plain(m) and "balance is 7" in plain(m))
    async with app.test_matcher(matcher) as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF_ID))
        event = group_event([MessageSegment.text("/grant "), MessageSegment.at(55555), " 7"])
        ctx.receive_event(bot, event)
        ctx.should_pass_rule(matcher)
        ctx.should_call_api("send_msg", to_group(granted), {"message_id": 1})
    credits = await qq_services.store.credits(target.id, date.today(), 0)
    assert credits.balance == 7


async def test_reply_segment_alone_finds_the_result_when_get_msg_gave_nothing(
    app: App, matcher: type[Matcher], qq_services: Services, mock_upstream: MockUpstream
) -> None:
    # An implementation whose get_msg fails leaves `event.reply` empty and the reply segment
    # in the message; the segment's id is all /reroll needs (no get_msg call is announced).
    job = await _job(qq_services)
    await qq_services.remember_result("qq", f"group:{GROUP}", "777", job)
    reroll = group_event([MessageSegment.reply(777), MessageSegment.text("/reroll")])
    async with app.test_api() as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF_ID))
        ctx.should_call_api("send_msg", to_group(Matching()), {"message_id": 778})
        ctx.should_call_api(
            "send_msg",
            to_group(Matching(replies_with_image(reroll.message_id))),
            {"message_id": 779},
        )
        ctx.should_call_api("delete_msg", {"message_id": 778}, None)
        await handle_event(bot, reroll)
        await qq_services.jobs.wait_idle()
    assert mock_upstream.requests[-1].fields.get("prompt") == "x"
    second = await qq_services.job_for_message("qq", f"group:{GROUP}", "779")
    assert second is not None and second != job


async def test_quoted_message_in_a_loose_get_msg_answer_still_gives_its_image(
    app: App,
    matcher: type[Matcher],
    images: ImageHost,
    qq_services: Services,
    mock_upstream: MockUpstream,
) -> None:
    # No time, real_id or sender, and the message as CQ codes: nonebot's Reply model refuses
    # this answer, the image in it is still there.
    url = images.add("loose.png", png(44, 33))
    event = group_event([MessageSegment.reply(9200), MessageSegment.text("/edit add a hat")])
    loose = {"message_id": 9200, "message": f"[CQ:image,file=loose.png,url={url}]"}
    async with app.test_api() as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF_ID))
        ctx.should_call_api("get_msg", {"message_id": 9200}, loose)
        ctx.should_call_api("send_msg", to_group(Matching()), {"message_id": 921})
        ctx.should_call_api(
            "send_msg",
            to_group(Matching(replies_with_image(event.message_id))),
            {"message_id": 922},
        )
        ctx.should_call_api("delete_msg", {"message_id": 921}, None)
        await handle_event(bot, event)
        await qq_services.jobs.wait_idle()
    assert images.requests == ["loose.png"]
    assert [(f.width, f.height) for f in mock_upstream.requests[-1].files] == [(44, 33)]


async def test_implementation_without_send_msg_is_answered_with_send_group_msg(
    app: App, qq_services: Services
) -> None:
    first = Matching(lambda m: plain(m) == "one")
    second = Matching(lambda m: plain(m) == "two")
    unknown = ActionFailed(status="failed", retcode=1404, message="unsupported action")
    async with app.test_api() as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF_ID))
        chat = _chat(bot, qq_services)
        ctx.should_call_api("send_msg", to_group(Matching()), exception=unknown)
        ctx.should_call_api(
            "send_group_msg", {"group_id": GROUP, "message": first}, {"message_id": 31}
        )
        # Known from now on: straight to send_group_msg.
        ctx.should_call_api(
            "send_group_msg", {"group_id": GROUP, "message": second}, {"message_id": 32}
        )
        refs = [await chat.send_text("one"), await chat.send_text("two")]
    assert [r.id if r else None for r in refs] == ["31", "32"]


async def test_other_send_refusals_are_not_taken_for_a_missing_action(
    app: App, qq_services: Services
) -> None:
    muted = ActionFailed(status="failed", retcode=100, message="bot is muted in this group")
    async with app.test_api() as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF_ID))
        chat = _chat(bot, qq_services)
        ctx.should_call_api("send_msg", to_group(Matching()), exception=muted)
        assert await chat.send_text("hello") is None


async def test_refused_result_image_goes_once_more_as_a_preview_with_the_original_as_a_file(
    app: App, qq_services: Services
) -> None:
    original = png(300, 200, (30, 160, 90))
    refused = ActionFailed(status="failed", retcode=1200, message="rich media transfer failed")
    preview = Matching(lambda m: len(image_bytes(m)) == 1)
    upload = Matching(lambda f: f == "base64://" + base64.b64encode(original).decode())
    async with app.test_api() as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF_ID))
        chat = _chat(bot, qq_services)
        ctx.should_call_api("send_msg", to_group(Matching()), exception=refused)
        ctx.should_call_api("send_msg", to_group(preview), {"message_id": 812})
        ctx.should_call_api(
            "upload_group_file", {"group_id": GROUP, "file": upload, "name": "r.png"}, None
        )
        job = await _job(qq_services)
        await chat.send_results(
            [OutFile(original, "r.png", "image/png", 300, 200)], ResultMeta(job)
        )
    assert Image.open(io.BytesIO(image_bytes(preview.seen[0])[0])).format == "JPEG"
    assert await qq_services.job_for_message("qq", f"group:{GROUP}", "812") == job


async def test_originals_go_as_images_where_group_file_upload_is_refused(
    app: App, qq_services: Services
) -> None:
    original = png(64, 48, (1, 2, 3))
    unknown = ActionFailed(status="failed", retcode=1404, message="unsupported action")
    sent = Matching(lambda m: image_bytes(m) == [original])
    async with app.test_api() as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF_ID))
        chat = _chat(bot, qq_services)
        ctx.should_call_api(
            "upload_group_file",
            {"group_id": GROUP, "file": Matching(), "name": "o.png"},
            exception=unknown,
        )
        ctx.should_call_api("send_msg", to_group(sent), {"message_id": 841})
        job = await _job(qq_services)
        await chat.send_results(
            [OutFile(original, "o.png", "image/png", 64, 48)],
            ResultMeta(job, originals=True, actions=False),
        )
    assert len(sent.seen) == 1


async def test_the_bots_own_messages_reported_back_are_never_commands(
    app: App, matcher: type[Matcher]
) -> None:
    async with app.test_matcher(matcher) as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF_ID))
        ctx.receive_event(bot, group_event("/help", user_id=SELF_ID))
        ctx.should_not_pass_rule(matcher)


async def test_banned_users_edit_downloads_none_of_its_references_an_allowed_one_does(
    app: App,
    matcher: type[Matcher],
    images: ImageHost,
    qq_services: Services,
    mock_upstream: MockUpstream,
) -> None:
    banned_id = USER + 40
    banned = await qq_services.store.user("qq", str(banned_id))
    await qq_services.store.set_role(banned.id, "banned")
    urls = [images.add(f"ref{i}.png", png(32 + 8 * i, 32)) for i in range(3)]

    def edit(user_id: int) -> GroupMessageEvent:
        # References in the message and in the quoted one: both paths stay unfetched.
        parts = [MessageSegment.text("/edit blend them")]
        parts += [MessageSegment.image(url) for url in urls[1:]]
        return group_event(
            parts, user_id=user_id, reply=quoted(9300, [MessageSegment.image(urls[0])])
        )

    refused, allowed = edit(banned_id), edit(USER)
    async with app.test_api() as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF_ID))
        ctx.should_call_api(
            "send_msg",
            to_group(Matching(replies_with_text(refused.message_id, t("en", "error.banned")))),
            {},
        )
        await handle_event(bot, refused)
        await qq_services.jobs.wait_idle()
        assert images.requests == []

        ctx.should_call_api("send_msg", to_group(Matching()), {"message_id": 801})
        ctx.should_call_api(
            "send_msg",
            to_group(Matching(replies_with_image(allowed.message_id))),
            {"message_id": 802},
        )
        ctx.should_call_api("delete_msg", {"message_id": 801}, None)
        await handle_event(bot, allowed)
        await qq_services.jobs.wait_idle()
    assert sorted(images.requests) == ["ref0.png", "ref1.png", "ref2.png"]
    edit_request = mock_upstream.requests[-1]
    assert sorted(f.width for f in edit_request.files) == [32, 40, 48]
