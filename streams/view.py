"""This worker's reader of the shared item-side topics (see :mod:`stores.shared_view`)."""
from __future__ import annotations

import asyncio

from stores.shared_view import SharedItemView
from streams.app import app
from streams.settings import settings

view = SharedItemView(settings.bootstrap)


@app.task
async def start_view() -> None:
    view.start()
    caught_up = await asyncio.get_running_loop().run_in_executor(None, view.wait_caught_up, 60.0)
    app.logger.info("shared item view %s (%d messages)",
                    "caught up" if caught_up else "still catching up", view.messages)
