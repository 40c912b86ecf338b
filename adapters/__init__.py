"""Chat platforms, one folder each.

Each platform package exports `create_platform(settings, services) -> bot.platform.Platform`
and is registered in pyproject.toml under the `drawbridge.platforms` entry-point group, so
`drawbridge run` finds it without `bot/` importing any adapter.
"""
