"""Slash commands: the tree discord.py syncs, and the answer to one interaction (deferred
at most once, streamed into the original response, follow-ups for the rest)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import discord
from discord import app_commands

from bots.discord.rendering import NO_MENTIONS, AnyMessage, respond
from bots.discord.streaming import StreamTiming, finish_live, streamed
from bots.live import (
    LiveMessage,
)
from core.dialogue.commands import Command
from core.dialogue.texts import DESCRIPTIONS
from core.messages import Reply

SLASH_COMMANDS = tuple(c for c in Command if c is not Command.START)  # Discord has no /start
TEXT_ARGUMENTS = {  # slash commands that need text, and how their option is described
    Command.COMPLETE: "이어 쓸 문장 (text to continue)",
    Command.STORY: "이야기의 첫 문장 (the story's opening)",
    Command.SENTIMENT: "분석할 문장 (text to analyse)",
}
PRIVATE_COMMANDS = frozenset(
    {Command.HELP, Command.FORGET, Command.EXPORT, Command.STATS, Command.LINK, Command.UNLINK}
)
STREAMED_COMMANDS = frozenset({Command.COMPLETE, Command.STORY, Command.RETRY})


def describe(command: Command) -> str:
    korean, english = DESCRIPTIONS[command]
    return f"{korean} ({english})"[:100]


SlashHandler = Callable[[discord.Interaction, Command, str], Awaitable[None]]


def plain_command(command: Command, handle: SlashHandler) -> app_commands.Command[Any, ..., None]:
    async def callback(interaction: discord.Interaction) -> None:
        await handle(interaction, command, "")

    return app_commands.Command(
        name=command.value, description=describe(command), callback=callback
    )


def persona_command(handle: SlashHandler) -> app_commands.Command[Any, ..., None]:
    @app_commands.describe(text="새 페르소나, 또는 clear (new persona, or clear); 비우면 보기")
    async def callback(interaction: discord.Interaction, text: str | None = None) -> None:
        await handle(interaction, Command.PERSONA, text or "")

    return app_commands.Command(
        name=Command.PERSONA.value, description=describe(Command.PERSONA), callback=callback
    )


def link_command(handle: SlashHandler) -> app_commands.Command[Any, ..., None]:
    @app_commands.describe(
        code="다른 계정에서 받은 코드; 비우면 새 코드 (code from your other account)"
    )
    async def callback(interaction: discord.Interaction, code: str | None = None) -> None:
        await handle(interaction, Command.LINK, code or "")

    return app_commands.Command(
        name=Command.LINK.value, description=describe(Command.LINK), callback=callback
    )


def text_command(command: Command, handle: SlashHandler) -> app_commands.Command[Any, ..., None]:
    """A slash command with one required text option (`/complete text:…`)."""

    @app_commands.describe(text=TEXT_ARGUMENTS[command])
    async def callback(interaction: discord.Interaction, text: str) -> None:
        await handle(interaction, command, text)

    return app_commands.Command(
        name=command.value, description=describe(command), callback=callback
    )


def build_command_tree(client: discord.Client, handle: SlashHandler) -> app_commands.CommandTree:
    tree: app_commands.CommandTree = app_commands.CommandTree(client)
    for command in SLASH_COMMANDS:
        if command is Command.PERSONA:
            tree.add_command(persona_command(handle))
        elif command is Command.LINK:
            tree.add_command(link_command(handle))
        elif command in TEXT_ARGUMENTS:
            tree.add_command(text_command(command, handle))
        else:
            tree.add_command(plain_command(command, handle))
    return tree


class InteractionAnswer:
    """The answer to one slash command: deferred at most once (by the clock or by the first
    streamed text, whichever comes first), streamed into the original response by edits
    (`PATCH …/messages/@original`), the rest of a long reply sent as follow-ups."""

    def __init__(self, interaction: discord.Interaction, ephemeral: bool) -> None:
        self.interaction = interaction
        self.ephemeral = ephemeral
        self._deferring = asyncio.Lock()

    async def defer(self) -> None:
        async with self._deferring:
            if not self.interaction.response.is_done():
                await self.interaction.response.defer(ephemeral=self.ephemeral, thinking=True)

    def live(self, timing: StreamTiming) -> LiveMessage[AnyMessage]:
        async def post(text: str) -> AnyMessage:
            await self.defer()
            return await self.interaction.edit_original_response(
                content=text, allowed_mentions=NO_MENTIONS
            )

        return streamed(post, NO_MENTIONS, timing)

    async def follow_up(self, chunk: str) -> str:
        posted = await self.interaction.followup.send(
            chunk, ephemeral=self.ephemeral, allowed_mentions=NO_MENTIONS, wait=True
        )
        return str(posted.id)

    async def send(
        self, reply: Reply, private: bool, live: LiveMessage[AnyMessage] | None
    ) -> list[str]:
        """The reply, finishing the streamed answer if there is one; the ids of its messages."""
        streamed_ids = await finish_live(live, reply, self.follow_up)
        return streamed_ids or await respond(self.interaction, reply, private)
