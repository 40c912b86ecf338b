"""/draw, /edit and the result actions (reroll, original file)."""

from __future__ import annotations

from bot import errors
from bot.chat import BytesImage, ResultMeta
from bot.jobs import JobSpec
from bot.sizes import parse_size
from bot.store import Job
from plugins import confirm
from plugins.context import Context
from plugins.group import image_defaults
from plugins.options import parse_image_args


async def draw(ctx: Context) -> None:
    """`/draw <prompt> [--size] [--n] [--quality] [--format]`."""
    await _image_job(ctx, "draw")


async def edit(ctx: Context) -> None:
    """`/edit <prompt>` with images attached, replied to, or from a result being edited."""
    await _image_job(ctx, "edit")


async def _image_job(ctx: Context, kind: str) -> None:
    settings = ctx.services.settings
    jobs = ctx.services.jobs
    inv = ctx.inv
    # The group's own defaults (/group size, /group quality), where the user gives none.
    group_size, group_quality = await image_defaults(ctx)
    try:
        opts = parse_image_args(
            inv.text,
            inv.options,
            model=settings.model,
            default_size=group_size or settings.default_size,
            max_n=settings.max_n,
        )
    except errors.InputError as exc:
        await jobs.reject(inv, ctx.user, kind, inv.text, exc)
        raise
    extra: list[bytes] = []
    if kind == "edit" and not inv.references and inv.reply_to_job is not None:
        job = await _visible_job(ctx, inv.reply_to_job)
        extra = [f.data for f in await jobs.stored_results(job.id)]
        if not extra:
            raise errors.NoReferenceImageError("result files gone")
    spec = JobSpec(
        kind=kind,
        prompt=opts.prompt,
        size=opts.size,
        n=opts.n,
        quality=opts.quality or group_quality,
        output_format=opts.output_format,
        background=opts.background,
        references=inv.references,
        size_given=opts.size_given,
    )
    await _start(ctx, spec, tuple(extra), dry_run=opts.dry_run)


async def reroll(ctx: Context) -> None:
    """Run a result's job again with the same prompt, options and references."""
    if ctx.inv.reply_to_job is None:
        await ctx.reply("reroll.need_reply")
        return
    job = await _visible_job(ctx, ctx.inv.reply_to_job)
    jobs = ctx.services.jobs
    references: tuple[BytesImage, ...] = ()
    if job.kind == "edit":
        stored = await jobs.stored_references(job.id)
        if not stored:
            await ctx.reply("result.gone")
            return
        references = tuple(BytesImage(data, f"ref{i + 1}") for i, data in enumerate(stored))
    options = job.options
    spec = JobSpec(
        kind=job.kind,
        prompt=job.prompt,
        size=parse_size(options.get("size") or "auto", ctx.services.settings.model),
        n=int(options.get("n") or 1),
        quality=options.get("quality"),
        output_format=options.get("format"),
        background=options.get("background"),
        references=references,
        # An edit stored without a size kept its images' shape: so does its reroll.
        size_given=job.kind != "edit" or bool(options.get("size")),
    )
    await _start(ctx, spec)


async def _start(
    ctx: Context, spec: JobSpec, extra: tuple[bytes, ...] = (), *, dry_run: bool = False
) -> None:
    """Say the price and stop (a dry run), ask first (a costly job), or submit the job.

    A dry run is not recorded in the job table: nothing was asked of the upstream, and the
    table's counts (stats, failures) stay about jobs.
    """
    jobs = ctx.services.jobs
    # The quote reads the caller's credits; only a dry run and a job priced above the
    # confirmation limit need them before the charge (the charge says what is left anyway).
    if dry_run or jobs.cost(ctx.user, spec) > ctx.services.settings.confirm_above:
        quote = await jobs.quote(ctx.user, spec)
        if dry_run:
            await ctx.chat.send_text(quote.render(ctx.lang) + "\n" + ctx.t("price.dry_run"))
            return
        if confirm.needs_confirmation(ctx, quote):
            # Nothing is reserved or downloaded until the caller confirms.
            await confirm.ask(ctx, spec, quote, extra)
            return
    await jobs.submit(
        inv=ctx.inv, user=ctx.user, chat=ctx.chat, spec=spec, lang=ctx.lang, extra_references=extra
    )


async def original(ctx: Context) -> None:
    """Send a result's original files uncompressed."""
    if ctx.inv.reply_to_job is None:
        await ctx.reply("reroll.need_reply")
        return
    job = await _visible_job(ctx, ctx.inv.reply_to_job)
    files = await ctx.services.jobs.stored_results(job.id)
    if not files:
        await ctx.reply("result.gone")
        return
    await ctx.chat.send_results(files, ResultMeta(job.id, originals=True, actions=False))


async def edit_hint(ctx: Context) -> None:
    """The Edit button: ask for the change (adapters turn the reply into an edit)."""
    await ctx.reply("edit.hint")


async def _visible_job(ctx: Context, job_id: int) -> Job:
    """A job whose result is visible in this chat (anyone here may reroll it, paying themselves)."""
    job = await ctx.services.store.job(job_id)
    if job is None or job.platform != ctx.inv.platform or job.chat_id != ctx.inv.chat_id:
        raise errors.JobNotFoundError(f"job {job_id} not in this chat")
    return job
