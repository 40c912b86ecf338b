"""English messages."""

MESSAGES: dict[str, str] = {
    # --- commands (help text and menus) ---
    "help.draw": "Draw an image from a prompt",
    "help.edit": "Edit images: reply to an image or attach some",
    "help.reroll": "Reply to a result to draw it again",
    "help.original": "Reply to a result to get the original file",
    "help.token": "Bind your own API key (private chat only), show or clear it",
    "help.quota": "Your credits today and your balance",
    "help.help": "How to use this bot",
    "help.cancel": "Cancel your queued job",
    "help.lang": "Choose the language: zh, en or auto",
    "help.whoami": "Your id, as the bot's admins list takes it",
    "help.confirm": "Confirm your request that costs more than usual",
    "help.grant": "Admin: give a user credits",
    "help.ban": "Admin: ban a user",
    "help.unban": "Admin: unban a user",
    "help.stats": "Admin: usage today",
    "help.header": "drawbridge makes and edits images with {model}.",
    "help.line": "/{name}{aliases} {args}: {text}",
    "help.options": (
        "Options: --size 16:9 | 9:16 | 1:1 | 4:3 | 3:2 | 2k | 4k | 16:9@4k | 1536x1024, "
        "--n 1-{max_n}, --quality low|medium|high, --format png|jpeg|webp, --background transparent, "
        "--dry-run (the price only, nothing runs)"
    ),
    "help.footer": "Each image costs credits from your daily allowance ({daily} a day) "
    "unless you bind your own key with /token in a private chat.",
    "help.examples": "Example: /draw a red fox in the snow --size 16:9",
    "opt.size": "Size: a ratio like 16:9, a tier 1k/2k/4k, or WxH",
    "opt.quality": "Quality: low, medium, high or auto",
    "opt.n": "How many images",
    "opt.format": "File format: png, jpeg or webp",
    "opt.background": "Background: transparent, opaque or auto",
    "opt.dry_run": "Only show the price; start nothing",
    "opt.lang": "Language",
    "opt.user": "User id (or platform:id)",
    "opt.credits": "Credits to add (negative to take away)",
    "opt.prompt": "What to draw",
    "opt.image": "Reference image",
    "arg.prompt": "<prompt>",
    "arg.key": "[key|clear]",
    "arg.user": "<user>",
    "arg.lang": "zh|en|auto",
    # --- job progress ---
    "status.queued": "Queued #{position} (job {job}). I'll start soon.",
    "status.started": "Drawing... (job {job})",
    "status.drawing": "Drawing... {elapsed} (job {job})",
    "status.uploading": "Uploading the result... (job {job})",
    "status.refunded": "Nothing was charged.",
    # --- the price before you pay, and the estimate (issue 14) ---
    "price.image_one": "1 image",
    "price.images": "{n} images",
    "price.credit_one": "1 credit",
    "price.credits": "{n} credits",
    "price.line": "{what}: {cost}, {left} left after this",
    "price.own_key": "{what}: your own key pays for this",
    "price.short": "{what}: {cost}, but you have {left}",
    "price.dry_run": "Dry run (--dry-run): nothing was started or charged.",
    "eta.queued": "Ready in about {median} (at most {p90})",
    "eta.running": "Usually takes about {median} (at most {p90})",
    "eta.overdue": "Taking longer than usual (usually {median})",
    "confirm.ask_button": "{price}\nThat is more than {limit} credits: press Confirm within "
    "{seconds} s to start. Nothing is charged until then.",
    "confirm.ask_reply": "{price}\nThat is more than {limit} credits: reply /confirm within "
    "{seconds} s to start. Nothing is charged until then.",
    "confirm.button": "Confirm",
    "confirm.nothing": "Nothing to confirm: a request waits {seconds} s for its confirmation.",
    "confirm.not_yours": "Only the person who asked for this job can confirm it.",
    "result.caption": "{prompt}\n{size} · {seconds}s",
    "result.caption_fallback": "{prompt}\n{size} (4K was refused, drew {fallback}) · {seconds}s",
    "result.actions": "Job {job}: what next?",
    "result.gone": "That result is no longer kept. Draw it again with /draw.",
    "result.not_found": "I can't find that job.",
    "result.fewer_images": "The image service returned {count} of the {n} images asked for.",
    "result.fallback_charge": "Charged {charged} credits, the {fallback} price; {refunded} came back to you.",
    "result.partial_charge": "Charged {charged} credits for the images you got; {refunded} came back to you.",
    "result.partial_delivery": "Only {count} of the {total} images could be sent here; you were charged for those {count} only.",
    "reroll.need_reply": "Reply to one of my results with /reroll to draw it again.",
    "edit.hint": 'Reply to this message with what to change, e.g. "make it night time".',
    # --- buttons, modals and menus ---
    "button.reroll": "Reroll",
    "button.edit": "Edit",
    "button.original": "Original file",
    "button.reference": "Use as reference",
    "modal.edit_title": "Edit this image",
    "modal.reference_title": "New image from this one",
    "modal.prompt_label": "Prompt",
    "modal.token_title": "Your API key",
    "modal.token_label": "Key (empty: show, clear: remove)",
    "menu.edit_image": "Edit image",
    "result.preview_note": "The original is over this chat's {limit_mb} MB upload limit; this is a compressed preview.",
    # --- account ---
    "token.bound": "Your key {masked} is bound. Your images now use your key and cost no credits.",
    "token.status": "Your key: {masked}. Images use your key and cost no credits.",
    "token.none": "You have no key bound; images use the shared key and your credits. "
    "Bind yours with /token <key> in a private chat.",
    "token.cleared": "Your key was removed. Images use the shared key and your credits again.",
    "token.not_set": "You have no key bound.",
    "token.bad_format": "That does not look like an API key. Send /token sk-... in a private chat.",
    "token.group_deleted": "{user}, I deleted your message: never post an API key in a group. "
    "Send /token <key> to me in a private chat. Anyone may have seen it: consider replacing it.",
    "token.group_not_deleted": "{user}, never post an API key in a group! I could not delete "
    "it: delete it now and replace the key at your provider. Bind keys in a private chat only.",
    "quota.text": "Credits today: {daily_left}/{daily_total} (resets at midnight {tz})\n"
    "Balance: {balance}\nKey: {key_status}\nJobs running or queued: {active}",
    "quota.own_key": "your own ({masked}), no credits needed",
    "quota.shared_key": "the shared key",
    "token.refused": "Your key was not bound: the provider refused it ({reason}). "
    "Check the key and send /token <key> again.",
    "token.no_model": "Warning: this key's model list does not include {model}, so images will "
    "fail until your provider enables it for the key's group.",
    "token.unchecked": "Note: the provider could not be reached to check the key ({reason}); "
    "it is bound anyway.",
    "token.balance": "Key balance: {balance} (as your provider reports it)",
    "token.unlimited": "Key balance: unlimited",
    "quota.key.balance": "Key balance: {balance} (as your provider reports it)",
    "quota.key.unlimited": "Key balance: unlimited",
    "cancel.done": "Cancelled job {job}. Nothing was charged.",
    "cancel.none": "You have no queued job to cancel (running jobs cannot be cancelled).",
    "lang.set": "Language set to English.",
    "lang.auto": "Language follows your app's setting again.",
    "lang.bad": "Choose zh, en or auto.",
    "whoami.text": "{who}\n(your id in the form DRAWBRIDGE_ADMINS takes)",
    "whoami.group": "This group: {space} (the form DRAWBRIDGE_GROUPS takes)",
    # --- admin ---
    "admin.granted": "Gave {credits} credits to {user}; their balance is {balance}.",
    "admin.banned": "{user} is banned.",
    "admin.unbanned": "{user} is no longer banned.",
    "admin.user_not_found": "No user {user}. Use their id, or platform:id.",
    # --- the operator console (adapters/console) ---
    "help.console": "Admin: a one-time link to the web console (private chat)",
    "console.off": "The console is off: set DRAWBRIDGE_CONSOLE_PASSWORD.",
    "console.no_url": "Set DRAWBRIDGE_CONSOLE_URL (the console's public address) for login links.",
    "console.private_only": "Ask for the console link in a private chat with me.",
    "console.link": "Your console login link, valid {minutes} minutes and usable once:\n{link}",
    "console.title": "drawbridge console",
    "console.nav.overview": "Overview",
    "console.nav.jobs": "Jobs",
    "console.nav.users": "Users",
    "console.nav.ledger": "Ledger",
    "console.nav.providers": "Providers",
    "console.nav.settings": "Settings",
    "console.nav.logs": "Logs",
    "console.logout": "Log out",
    "console.login.title": "Log in to the drawbridge console",
    "console.login.password": "Password",
    "console.login.submit": "Log in",
    "console.login.wrong": "Wrong password.",
    "console.login.link": "Log in with the link the bot sent you (it works once).",
    "console.login.link_used": "This link has expired or was used already. Send /console again.",
    "console.now": "Now",
    "console.now.queued": "Queued",
    "console.now.running": "Running",
    "console.range.24h": "Last 24 h",
    "console.range.7d": "Last 7 days",
    "console.range.30d": "Last 30 days",
    "console.jobs": "Jobs",
    "console.jobs_hour": "Jobs (last hour)",
    "console.jobs_per_hour": "Jobs per hour",
    "console.by_platform": "By platform",
    "console.platform": "Platform",
    "console.succeeded": "Succeeded",
    "console.failed": "Failed",
    "console.success_rate": "Success rate",
    "console.credits_spent": "Credits spent",
    "console.time_to_image": "Time to image (queued to delivered)",
    "console.provider": "Provider",
    "console.tier": "Size tier",
    "console.failures": "Failures by error kind",
    "console.error_kind": "Error kind",
    "console.top_users": "Top users",
    "console.top_groups": "Top groups",
    "console.user": "User",
    "console.group": "Group",
    "console.chat": "Chat",
    "console.status": "Status",
    "console.date": "Date",
    "console.filter": "Filter",
    "console.matching": "{count} matching",
    "console.when": "When",
    "console.prompt": "Prompt",
    "console.size": "Size",
    "console.quality": "Quality",
    "console.refs": "References",
    "console.times": "Queued / running / delivering",
    "console.cost": "Spent / reserved",
    "console.error": "Error",
    "console.job": "Job #{id}",
    "console.refund": "Refund {credits} credits",
    "console.kind": "Kind",
    "console.job_col": "Job",
    "console.daily": "Daily",
    "console.balance": "Balance",
    "console.note": "Note",
    "console.search": "Platform id or name",
    "console.role": "Role",
    "console.today": "Used today / allowance",
    "console.key": "Own key",
    "console.no_key": "none",
    "console.actions": "Actions",
    "console.credits": "Credits",
    "console.grant": "Grant",
    "console.ban": "Ban",
    "console.unban": "Unban",
    "console.rows": "Rows",
    "console.last_error": "Last error",
    "console.capabilities": "Learned capabilities",
    "console.settings.readonly": "Read-only: change settings in .env and restart.",
    "console.setting": "Setting",
    "console.value": "Value",
    "console.source": "From",
    "console.level": "Level",
    "console.nav.groups": "Groups",
    "console.cap": "Daily cap",
    "console.no_cap": "none",
    "console.enabled": "On",
    "console.yes": "yes",
    "console.no": "no",
    "console.cooldown": "Cooldown (s)",
    "console.results": "Results",
    "console.doctor": "Run the doctor (free checks)",
    "console.missing": "Not found.",
    "console.allowance": "Daily allowance",
    "console.allowance.own": "own",
    "console.allowance.set": "Set allowance",
    "console.allowance.hint": "Free credits a day for this user; empty: the default ({daily})",
    "console.probe.ok": "key accepted",
    "console.probe.no_model": "key accepted, model not in its list",
    "console.probe.invalid_key": "key refused",
    "console.probe.unreachable": "relay unreachable",
    "console.probe.error": "check failed",
    "console.probe.balance": "balance read",
    "console.probe.no_balance": "no balance reported",
    "console.probe.amount": "balance {balance}",
    "console.probe.unlimited": "unlimited",
    "console.probe.never": "not checked yet",
    "console.upstream_cost": "Estimated upstream cost",
    "console.by_provider": "By provider",
    "console.images": "Images",
    "console.unpriced": "Images without a price",
    "console.cost.note": "From DRAWBRIDGE_UPSTREAM_PRICES: the images succeeded jobs delivered, "
    "at the size drawn and the quality asked. Jobs on users' own keys are left out.",
    "console.cost.none": "Set DRAWBRIDGE_UPSTREAM_PRICES to estimate what providers charge.",
    "admin.usage_grant": "Usage: /grant <user> <credits>",
    "admin.stats": "Today: {jobs} jobs ({succeeded} ok, {failed} failed), {images} images, "
    "{credits} credits spent, {running} running now. Users: {users}.",
    # --- errors (each names what happened and what to do) ---
    "note.own_key_maybe_billed": "(Your own API key may still have been billed by its provider for this attempt.)",
    "error.internal": "Something went wrong on my side. Nothing was charged; please try again.",
    "error.bad_input": "I couldn't understand that request.",
    "error.bad_option": "Invalid value for --{option}: {value}. See /help.",
    "error.unknown_option": "Unknown option {option}. Options are --size, --n, --quality, --format, --background.",
    "error.invalid_size": "Size {size} is not allowed for this model. Try {suggestion}.",
    "error.empty_prompt": "Tell me what to draw, e.g. /draw a red fox in the snow.",
    "error.prompt_too_long": "Your prompt has {length} characters; the limit is {limit}. Please shorten it.",
    "error.no_reference": "/edit needs an image: reply to an image with /edit <prompt>, or attach one.",
    "error.too_many_references": "You sent {count} images; this provider takes at most {limit}.",
    "error.bad_image": "One of the images is damaged or unreadable. Please send another one.",
    "error.unsupported_image": "That file is not a supported image. Send PNG, JPEG, WebP, GIF, HEIC, AVIF, BMP or TIFF.",
    "error.svg_image": "SVG is a drawing format, not a picture: send PNG, JPEG, WebP, GIF, HEIC, AVIF, BMP or TIFF.",
    "error.image_too_large": "That image is too large ({size_mb} MB). "
    "The limit is {limit_mb} MB; please send a smaller one.",
    "error.image_too_many_pixels": "That image is too big ({megapixels} megapixels; the limit is {limit_mp}). Please send a smaller one.",
    "error.job_too_many_pixels": "These {count} images are too big together ({megapixels} megapixels; one request takes at most {limit_mp}). Please send fewer or smaller images.",
    "error.image_fetch_failed": "I couldn't download the image (it may have expired). "
    "Please send it again.",
    "error.forbidden_url": "I can't download images from that address.",
    "error.access_denied": "You are not allowed to do that.",
    "error.banned": "You are banned from using this bot.",
    "error.not_admin": "Only admins can do that.",
    "error.insufficient_credits": "Not enough credits: this needs {needed}, you have {left}. "
    "Your daily credits reset at midnight, or bind your own key with /token in a private chat.",
    "error.group_cap": "This group has used its {cap} credits for today. Try again tomorrow.",
    "error.busy": "I'm very busy right now. Please try again in a few minutes; nothing was charged.",
    "error.too_many_jobs": "You already have {limit} jobs running or queued. Wait for them to finish.",
    "error.not_configured": "No API key is configured for this bot. "
    "Bind your own with /token in a private chat, or ask the admin.",
    "error.key_unreadable": "Your saved API key can no longer be read (the bot's secret key changed). Bind it again with /token in a private chat, or /token clear to use credits. Nothing was charged.",
    "error.shutdown": "The bot is restarting; your job was stopped and nothing was charged. "
    "Please try again in a minute.",
    "error.cancelled": "Job {job} was cancelled. Nothing was charged.",
    "error.delivery_failed": "The image was made but I couldn't send it here. "
    "Nothing was charged; please try again.",
    "error.interrupted": 'Job {job} ("{prompt}") was interrupted by a restart. Your credits were refunded; please send it again.',
    "error.upstream": "The image service refused the request: {reason}. Nothing was charged.",
    "error.invalid_key": "The API key was refused (invalid, expired or used up). "
    "If it is your own key, bind a new one with /token in a private chat; otherwise tell the admin. Nothing was charged.",
    "error.upstream_quota": "The API account has no balance left. If it is your key, top it up "
    "at your provider; otherwise tell the admin. Nothing was charged.",
    "error.no_channel": "The key's group has no channel for this model right now "
    "(the key's group lacks this model). Try later, or use a key from another group. Nothing was charged.",
    "error.group_denied": "The key is not allowed to use its group. Check the key's group at "
    "your provider. Nothing was charged.",
    "error.moderation": "The image service refused this prompt (content policy). "
    "Please rephrase it; nothing was charged.",
    "error.upstream_invalid_size": "The image service refused this size. "
    "Try a common size such as 1024x1024 or 16:9. Nothing was charged.",
    "error.unknown_parameter": "The image service does not accept a parameter we sent "
    "({param}). Tell the admin; nothing was charged.",
    "error.rate_limited": "The image service is rate limiting us. Please try again in a minute; "
    "nothing was charged.",
    "error.request_too_large": "The request was too large for the image service. "
    "Use fewer or smaller images. Nothing was charged.",
    "error.upstream_unavailable": "The image service is down or overloaded. "
    "Please try again later; nothing was charged.",
    "error.not_supported": "This image service does not support making images from a prompt. "
    "Nothing was charged.",
    "error.not_supported_edit": "This image service does not support editing images. Nothing was charged.",
    "error.timeout": "The image service took too long to answer. Nothing was charged; "
    "please try again (maybe a smaller size or lower quality).",
    "error.malformed_response": "The image service sent back a broken answer. "
    "Nothing was charged; please try again.",
    "error.unknown_model": "This provider does not offer the model {model}. Tell the admin to "
    "check the model setting (DRAWBRIDGE_MODEL). Nothing was charged.",
    "error.relay_cannot_stream": "The provider's relay cannot pass on streamed images, so this "
    'image was lost. The admin should set "stream": false for this provider. Nothing was charged.',
    "error.relay_failed": "The provider's relay failed while passing on the answer ({reason}). "
    "The image may already have been paid for upstream, so I did not retry; please tell the admin. "
    "Nothing was charged.",
    "error.result_download_failed": "I couldn't download the finished image (its link expired "
    "or failed). Nothing was charged; please try again.",
    # --- sizes a user typed wrong ---
    "error.size_ratio": "The ratio {size} is too wide or too tall: this model draws at most "
    "{limit}. The nearest valid ratio is {suggestion}.",
    "error.size_tier": "There is no {tier} size: the tiers are 1k, 2k and {largest}, the "
    "largest. Try {suggestion}.",
    "error.size_format": "I can't read the size {size}. Write a ratio (16:9, 9:16, 1:1), a tier "
    "(1k, 2k, 4k), both (16:9 4k), width x height (1536x1024), landscape, portrait, square or "
    "auto. Try {suggestion}.",
    # --- the same messages in a terminal (`drawbridge draw`/`edit`), where a chat message
    # would tell the user to do a chat thing (bot/terminal.py looks these up first) ---
    "terminal.error.bad_option": "Invalid value for --{option}: {value}.",
    "terminal.error.empty_prompt": 'Tell me what to draw, e.g. drawbridge draw "a red fox in the snow".',
    "terminal.error.not_configured": "No API key is configured: set DRAWBRIDGE_API_BASE and "
    "DRAWBRIDGE_API_KEY (or DRAWBRIDGE_PROVIDERS).",
    "terminal.error.invalid_key": "The API key was refused (invalid, expired or used up): check "
    "DRAWBRIDGE_API_KEY (or the provider's key in DRAWBRIDGE_PROVIDERS).",
    "terminal.error.upstream_quota": "The API account has no balance left: top it up at the "
    "provider, or check DRAWBRIDGE_API_KEY.",
    "terminal.error.unknown_model": "This provider does not offer the model {model}: check "
    "DRAWBRIDGE_MODEL (or the provider's model in DRAWBRIDGE_PROVIDERS).",
    "terminal.error.unknown_parameter": "The image service does not accept a parameter we sent "
    "({param}).",
    "terminal.error.relay_cannot_stream": "The provider's relay cannot pass on streamed images, "
    'so this image was lost. Run with --no-stream, or set "stream": false for this provider.',
    "terminal.error.relay_failed": "The provider's relay failed while passing on the answer "
    "({reason}). The image may already have been paid for upstream, so it was not retried.",
    # --- /group (issue 14) ---
    "help.group": "Group admins: this group's rules (on/off, default size and quality, "
    "daily cap, cooldown)",
    "opt.group_setting": "What to change: on, off, size, quality, cap or cooldown",
    "opt.group_value": "The new value (a size, a quality, credits, seconds; off clears it)",
    "arg.setting": "[on|off|size|quality|cap|cooldown] [value]",
    "group.private_only": "/group sets a group's rules: use it in that group.",
    "group.not_admin": "Only this group's admins can change its rules.",
    "group.usage": "Change with: /group on|off, /group size 16:9, /group quality low, "
    "/group cap 50, /group cooldown 60 (off clears a setting)",
    "group.header": "This group's settings:",
    "group.saved": "Saved. This group's settings now:",
    "group.state_on": "Bot: on",
    "group.state_off": "Bot: off (only /group answers here)",
    "group.size": "Default size: {size} (the bot's: {default})",
    "group.quality": "Default quality: {quality}",
    "group.cap": "Daily cap: {cap} credits, {used} used today (the bot's cap: {limit})",
    "group.cooldown_line": "Cooldown between one member's jobs: {seconds} s",
    "group.none": "none",
    "group.cooldown": "Please wait {seconds} s: this group has a cooldown between one "
    "member's jobs.",
    "group.cap_above": "This group's cap can be at most {limit} credits (the bot's own cap), "
    "not {cap}.",
    "group.bad_size": "Give a size, such as /group size 16:9 (off: the bot's default).",
    "group.bad_quality": "Quality is low, medium, high or auto (off: the bot's default), "
    "not {value}.",
    "group.bad_cap": "The cap is a whole number of credits a day (off: none), not {value}.",
    "group.bad_cooldown": "The cooldown is whole seconds from 0 to {max}, not {value}.",
    # --- /link, /unlink (issue 14) ---
    "help.link": "One wallet on every platform: /link gives a code, /link CODE on another "
    "platform joins the two",
    "help.unlink": "Detach this platform's identity from your linked account",
    "arg.code": "[code]",
    "opt.code": "The code /link gave you on another platform",
    "link.code": "Your link code: {code}\nWithin {minutes} minutes, send /link {code} to the "
    "bot from your account on another platform (in a private chat there). Both then share one "
    "balance, one daily allowance, one key and one language.",
    "link.private_only": "Send /link to me in a private chat: the code must not be seen by others.",
    "link.code_exposed": "That code was posted where others can read it, so it no longer works. "
    "Get a new one with /link in a private chat and send /link CODE privately.",
    "link.done": "Linked. These identities now share one account: {identities}",
    "link.moved": "{credits} credits from this account were added to the joint balance.",
    "link.key_kept": "Both accounts had a key; the newer one ({masked}) is kept.",
    "link.refused.bad_code": "That code is not valid. Get a new one with /link.",
    "link.refused.expired": "That code has expired (codes last 10 minutes). Get a new one with "
    "/link.",
    "link.refused.own_code": "That is your own code: send it from your account on another "
    "platform.",
    "link.refused.already": "These identities already share one account.",
    "link.refused.banned": "A banned identity cannot be linked.",
    "link.refused.same_platform": "An account can hold one identity per platform, and this one "
    "already has an identity on this platform.",
    "link.refused.busy": "Wait until your running jobs have finished, then try again.",
    "unlink.done": "Detached. The credits stay with the account on your other platforms; here "
    "you start afresh.",
    "unlink.not_linked": "This identity is not linked to any other.",
    "quota.linked": "Linked identities: {identities}",
}
