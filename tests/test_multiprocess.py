"""Two `drawbridge run` processes on one PostgreSQL database (issue 15), end to end.

One serves QQ (a OneBot v11 client over WebSocket), the other Telegram (the fake Bot API
server); a QQ identity and a Telegram identity are linked into one account with one wallet.
Draws sent on both at the same instant never overspend it; the provider's `concurrency`
holds for both processes together (the mock upstream counts requests in flight); and when
one process is SIGKILLed mid-job, the other refunds its jobs, and only after the dead
process's heartbeat is older than DRAWBRIDGE_PROCESS_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from datetime import date
from pathlib import Path

from bot.mock_upstream import MockUpstream
from bot.secrets import KeyBox
from bot.store import Store
from tests.bot_process import BotProcess, bot_env
from tests.databases import Raw
from tests.fake_onebot import FakeOneBot, text
from tests.fake_telegram import FakeTelegram
from tests.test_store import assert_ledger_exact

TOKEN = "7654321098:AAHmultiProcessTokenValue_Zq8wK3mN5pR7"
PASSPHRASE = "one passphrase for both processes"
QQ_USER, TG_USER = 20001, 1001
CONCURRENCY = 2
TIMEOUT = 10.0  # DRAWBRIDGE_PROCESS_TIMEOUT: a process beats every third of it


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def one_wallet(url: str, credits: int) -> None:
    """QQ 20001 and Telegram 1001 joined (as /link does) into one account holding `credits`."""
    store = await Store.connect(url, keybox=KeyBox.load(Path("unused"), PASSPHRASE))
    try:
        qq = await store.user("qq", str(QQ_USER), "Alice on QQ")
        telegram = await store.user("telegram", str(TG_USER), "Alice")
        code = await store.create_link_code(qq.identity_id)
        await store.link(code, telegram.identity_id, date.today())
        await store.grant(qq.id, credits, note="test")
    finally:
        await store.close()


async def until(condition: object, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_two_processes_share_one_wallet_one_concurrency_and_recover_each_other(
    pg_url: str, tmp_path: Path, mock_upstream: MockUpstream
) -> None:
    mock_upstream.options.latency = 1.0
    await one_wallet(pg_url, credits=7)
    common = {
        "DRAWBRIDGE_DATABASE_URL": pg_url,
        "DRAWBRIDGE_SECRET_KEY": PASSPHRASE,
        "DRAWBRIDGE_API_BASE": mock_upstream.base_url,
        "DRAWBRIDGE_API_KEY": "sk-test-multi-0000",
        "DRAWBRIDGE_CONCURRENCY": str(CONCURRENCY),
        "DRAWBRIDGE_DAILY_CREDITS": "0",
        "DRAWBRIDGE_USER_MAX_JOBS": "20",
        "DRAWBRIDGE_DEFAULT_LANG": "en",
        "DRAWBRIDGE_PROCESS_TIMEOUT": str(TIMEOUT),
        "DRAWBRIDGE_SHUTDOWN_GRACE": "1",
    }
    port = _free_port()
    (tmp_path / "qq").mkdir()
    (tmp_path / "tg").mkdir()
    raw = Raw(pg_url)
    async with FakeTelegram(token=TOKEN) as telegram:
        qq_bot = BotProcess(
            bot_env(
                **common,
                DRAWBRIDGE_DATA_DIR=str(tmp_path / "qq" / "data"),
                QQ_ENABLED="true",
                HOST="127.0.0.1",
                PORT=str(port),
            ),
            tmp_path / "qq",
        )
        tg_bot = BotProcess(
            bot_env(
                **common,
                DRAWBRIDGE_DATA_DIR=str(tmp_path / "tg" / "data"),
                TELEGRAM_BOT_TOKEN=TOKEN,
                TELEGRAM_API_SERVER=telegram.base_url,
            ),
            tmp_path / "tg",
        )
        onebot = FakeOneBot(10001)
        try:
            await asyncio.gather(
                qq_bot.start(ready=r"\bqq ready\b", within=40),
                tg_bot.start(ready="telegram ready", within=40),
            )
            await onebot.connect(f"ws://127.0.0.1:{port}/onebot/v11/ws")
            await qq_bot.wait_output(r"Bot 10001.* connected")
            alice = telegram.user(TG_USER)
            private = telegram.private_chat(alice)

            # --- 12 draws at once, 6 on each platform, against 7 credits ---
            async def on_qq(n: int) -> None:
                await onebot.private_message(QQ_USER, [text(f"/draw qq fox {n}")])

            for n in range(6):
                telegram.send_message(private, alice, f"/draw telegram fox {n}")
            await asyncio.gather(*(on_qq(n) for n in range(6)))

            def settled() -> bool:
                active = raw.value(
                    "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')"
                )
                return raw.value("SELECT COUNT(*) FROM jobs WHERE status = 'succeeded'") == 7 and (
                    active == 0
                )

            await until(settled, 60, "7 draws to succeed and none to be left running")
            await asyncio.sleep(1.0)  # anything still in flight would show now
            assert raw.value("SELECT COUNT(*) FROM jobs WHERE status = 'succeeded'") == 7
            assert raw.value("SELECT granted FROM users WHERE account_id IS NULL AND id = 1") == 0
            assert raw.value("SELECT SUM(balance_amount) FROM ledger WHERE kind = 'commit'") == 7
            assert_ledger_exact(raw)
            # Both processes drew (the wallet is shared), one image request per paid draw,
            # and never more than `concurrency` of them at once for the two processes.
            platforms = {
                p for (p,) in raw.query("SELECT platform FROM jobs WHERE status = 'succeeded'")
            }
            assert platforms == {"qq", "telegram"}
            assert len(mock_upstream.requests) == 7
            assert mock_upstream.max_in_flight == CONCURRENCY

            # --- SIGKILL the QQ process mid-job: Telegram's refunds it after the timeout ---
            await asyncio.to_thread(
                raw.execute, "UPDATE users SET granted = granted + 2 WHERE id = 1"
            )
            await asyncio.to_thread(
                raw.execute,
                "INSERT INTO ledger (user_id, kind, balance_amount, created_at, note)"
                " VALUES (1, 'grant', 2, 0, 'test')",
            )
            mock_upstream.options.latency = 120
            await onebot.private_message(QQ_USER, [text("/draw a fox that never arrives")])
            await until(
                lambda: raw.value("SELECT COUNT(*) FROM jobs WHERE status = 'running'") == 1,
                30,
                "the QQ job to run",
            )
            (killed_job,) = raw.query("SELECT id FROM jobs WHERE status = 'running'")[0]
            await qq_bot.stop(signal.SIGKILL)
            killed_at = time.monotonic()
            last_beat = raw.value("SELECT MAX(heartbeat_at) FROM processes WHERE platforms = 'qq'")

            # The survivor leaves it alone while the heartbeat is fresh...
            fresh_until = last_beat + TIMEOUT - time.time()
            await asyncio.sleep(max(0.0, fresh_until - 0.5))
            assert raw.value("SELECT status FROM jobs WHERE id = ?", killed_job) == "running"
            assert raw.value("SELECT state FROM reservations WHERE job_id = ?", killed_job) == (
                "reserved"
            )
            # ...and refunds it once it is not.
            await until(
                lambda: (
                    raw.value("SELECT state FROM reservations WHERE job_id = ?", killed_job)
                    == "refunded"
                ),
                TIMEOUT + 10,
                "the survivor to refund the dead process's job",
            )
            assert time.monotonic() - killed_at >= fresh_until - 0.5
            status, kind = raw.query(
                "SELECT status, error_kind FROM jobs WHERE id = ?", killed_job
            )[0]
            assert (status, kind) == ("failed", "interrupted")
            assert raw.value("SELECT granted FROM users WHERE id = 1") == 2
            assert_ledger_exact(raw)
            await tg_bot.wait_output("refunded 1 job\\(s\\) of a process that stopped beating")
        except BaseException:
            # What each process and the database saw, for whoever reads the failure.
            print("qq process:\n", qq_bot.log[-6000:])
            print("telegram process:\n", tg_bot.log[-6000:])
            print("processes:", raw.query("SELECT * FROM processes"), "now:", time.time())
            print(
                "jobs:", raw.query("SELECT id, platform, status, error_kind, process_id FROM jobs")
            )
            raise
        finally:
            await onebot.close()
            for bot in (qq_bot, tg_bot):
                if bot.process is not None and bot.process.returncode is None:
                    await bot.stop()
            raw.close()
    assert tg_bot.process is not None and tg_bot.process.returncode == 0, tg_bot.log[-3000:]
