"""Every user-facing string of the dialogue: command descriptions, help and replies (Korean
first, English in parentheses)."""

from __future__ import annotations

from core.dialogue.commands import Command

# (Korean, English) one-line descriptions, also used for Telegram's and Discord's command menus.
DESCRIPTIONS: dict[Command, tuple[str, str]] = {
    Command.START: ("봇 시작 인사", "Start and say hello"),
    Command.HELP: ("사용법 보기", "Show how to use the bot"),
    Command.RESET: ("대화 맥락 초기화", "Start a fresh conversation context"),
    Command.PERSONA: ("페르소나 보기/설정/해제", "Show, set or clear this chat's persona"),
    Command.FORGET: ("내 기록 모두 삭제", "Delete everything stored about me"),
    Command.EXPORT: ("내 대화 기록 JSON 받기", "Get my history as a JSON file"),
    Command.STATS: ("통계 (관리자)", "Statistics (admins)"),
    Command.ABOUT: ("모델과 라이선스 정보", "About the model and its licence"),
    Command.COMPLETE: ("문장 이어 쓰기", "Continue a sentence"),
    Command.STORY: ("이야기 지어 주기", "Write a story from an opening"),
    Command.SENTIMENT: ("문장의 감정 분석 (긍정/부정)", "Positive or negative, with confidence"),
    Command.RETRY: ("마지막 메시지에 다른 대답", "Another answer to my last message"),
    Command.LINK: ("다른 플랫폼 계정과 연결", "Link my Discord and Telegram accounts"),
    Command.UNLINK: ("계정 연결 해제", "Unlink this account"),
}

# What follows the command in help texts (the commands that take an argument).
USAGE: dict[Command, str] = {
    Command.PERSONA: "[설명|clear]",
    Command.COMPLETE: "<문장>",
    Command.STORY: "<첫 문장>",
    Command.SENTIMENT: "<문장>",
    Command.LINK: "[코드]",
}


def help_text() -> str:
    lines = ["🤖 kobot 사용법 (How to use)", "그냥 말을 걸면 대답해요. (Just talk to me.)"]
    for command, (korean, english) in DESCRIPTIONS.items():
        if command is not Command.STATS:
            usage = f" {USAGE[command]}" if command in USAGE else ""
            lines.append(f"/{command.value}{usage} — {korean} ({english})")
    lines.append("/persona <설명> 으로 이 대화의 페르소나를 정하고, /persona clear 로 해제해요.")
    lines.append(
        "/link 로 받은 코드를 다른 플랫폼에서 /link <코드> 로 보내면 두 계정이 이어져요. "
        "(Get a code with /link, send /link <code> from your other account.)"
    )
    return "\n".join(lines)


START_TEXT = (
    "안녕하세요! KoGPT2로 대화하는 kobot이에요. 편하게 말을 걸어 주세요. "
    "사용법은 /help 를 입력하세요. (Hi! Talk to me in Korean; /help shows the commands.)"
)
ABOUT_TEXT = (
    "kobot은 SKT의 KoGPT2 (skt/kogpt2-base-v2) 모델로 대답해요. 모델은 CC-BY-NC-SA 4.0 "
    "라이선스(비상업적 이용, 동일조건변경허락)를 따르며, 대답은 사실과 다를 수 있어요. "
    "(Powered by KoGPT2, licensed CC-BY-NC-SA 4.0; replies may be wrong.)"
)
EMPTY_TEXT = "메시지가 비어 있어요. 하고 싶은 말을 적어 주세요. (Your message is empty.)"
RESET_TEXT = "대화 맥락을 초기화했어요. 새로 시작해요! (Context cleared; starting fresh.)"
FORGET_TEXT = (
    "저장된 회원님의 대화 기록과 페르소나를 모두 삭제했어요 ({count}개 항목). "
    "(Deleted everything stored about you.)"
)
FORGET_UNLINKED = " 연결된 계정도 모두 해제했어요. (Your linked accounts were unlinked too.)"
EXPORT_TEXT = "대화 기록을 JSON 파일로 보내 드려요. (Here is your history as JSON.)"
PERSONA_SHOW = "현재 페르소나: {persona}\n(/persona <설명> 으로 바꾸고 /persona clear 로 해제해요.)"
PERSONA_SET = "이 대화의 페르소나를 바꿨어요: {persona} (Persona set.)"
PERSONA_CLEARED = "페르소나를 기본값으로 되돌렸어요. (Persona reset to the default.)"
PERSONA_TOO_LONG = "페르소나가 너무 길어요. {limit}자 이내로 적어 주세요. (Persona too long.)"
UNKNOWN_COMMAND = (
    "알 수 없는 명령이에요: /{name}. /help 로 사용법을 볼 수 있어요. (Unknown command; try /help.)"
)
NOT_ADMIN = "관리자만 쓸 수 있는 명령이에요. (Admins only.)"
RATE_LIMITED = (
    "메시지가 너무 빨라요. {seconds}초 뒤에 다시 보내 주세요. "
    "(Too many messages; please wait {seconds}s.)"
)
TRIMMED_NOTE = "(메시지가 길어서 끝부분만 읽었어요. Your message was long; I read its end.) "
BUSY_TEXT = (
    "지금 이 대화에서 이전 메시지에 답하는 중이에요. 잠시 후 다시 보내 주세요. "
    "(Still answering your previous message; please try again shortly.)"
)
GENERATION_FAILED = {
    "out_of_memory": "지금 서버가 바빠서 답을 만들지 못했어요. 잠시 후 다시 시도해 주세요. "
    "(The server is out of memory; please retry.)",
    "timeout": "답을 만드는 데 너무 오래 걸렸어요. 조금 뒤에 다시 물어봐 주세요. "
    "(Generation timed out; please retry.)",
    "unavailable": "지금 답을 만드는 서버에 연결할 수 없어요. 잠시 후 다시 시도해 주세요. "
    "(The reply server is unavailable right now; please retry shortly.)",
    "default": "죄송해요, 답을 만드는 중에 문제가 생겼어요. 잠시 후 다시 시도해 주세요. "
    "(Sorry, something went wrong; please retry.)",
}
NEEDS_TEXT = {
    Command.COMPLETE: "이어 쓸 문장을 함께 적어 주세요. 예: /complete 오늘 날씨가 "
    "(Add the text to continue, e.g. /complete 오늘 날씨가)",
    Command.STORY: "이야기의 첫 문장을 함께 적어 주세요. 예: /story 옛날 옛적에 "
    "(Add an opening, e.g. /story 옛날 옛적에)",
    Command.SENTIMENT: "분석할 문장을 함께 적어 주세요. 예: /sentiment 오늘 정말 행복해 "
    "(Add the text to analyse, e.g. /sentiment 오늘 정말 행복해)",
}
SENTIMENT_TEXT = "{label} (확신도 {confidence:.0%}) — {english}, confidence {confidence:.0%}"
SENTIMENT_ENGLISH = {"긍정": "positive", "부정": "negative"}
SENTIMENT_UNAVAILABLE = (
    "지금 쓰는 모델 백엔드에서는 감정 분석을 할 수 없어요. "
    "(Sentiment needs a backend that can score text, e.g. KOBOT_BACKEND=local.)"
)
NOTHING_TO_RETRY = (
    "다시 대답할 메시지가 없어요. 먼저 말을 걸어 주세요. "
    "(There is no message of yours to answer again yet.)"
)
NO_CONTINUATION = (
    "이어 쓸 말을 찾지 못했어요. 조금 다르게 적어 보시겠어요? "
    "(I could not continue that; try different words.)"
)
STORAGE_FAILED = (
    "죄송해요, 대화 기록 저장소에 문제가 있어요. 잠시 후 다시 시도해 주세요. "
    "(Storage is unavailable; please retry.)"
)
LINK_CODE = (
    "연결 코드: {code}\n{minutes}분 안에 다른 플랫폼(Discord 또는 Telegram)의 내 계정에서 "
    "/link {code} 를 보내면 두 계정이 한 사람으로 이어져요. 코드는 한 번만 쓸 수 있고, "
    "다른 사람에게 알려 주지 마세요. (Your link code: send /link {code} from your other "
    "account within {minutes} min. It works once; keep it to yourself.)"
)
LINK_PRIVATE_ONLY = (
    "계정 연결은 저와의 개인 채팅에서만 할 수 있어요. 개인 채팅에서 /link 를 보내 주세요. "
    "(Linking works only in a private chat with me; please send /link there.)"
)
LINK_CODE_SHOWN = (
    "이 코드는 다른 사람도 볼 수 있는 곳에 올라와서 취소했어요. 개인 채팅에서 /link 로 새 코드를 "
    "받아 주세요. (That code was posted where others can see it, so I cancelled it; get a new "
    "one with /link in a private chat.)"
)
LINK_WRONG = (
    "연결 코드가 맞지 않거나 만료됐어요. 다른 계정에서 /link 로 새 코드를 받아 주세요. "
    "(That code is wrong, used or expired; get a new one with /link.)"
)
LINK_TOO_MANY = (
    "잘못된 코드를 너무 많이 보냈어요. {minutes}분 뒤에 다시 시도해 주세요. "
    "(Too many wrong codes; please try again in {minutes} min.)"
)
LINK_OWN_CODE = (
    "이 코드는 바로 이 계정에서 받은 코드예요. 다른 플랫폼의 계정에서 보내 주세요. "
    "(That code is from this very account; send it from your other account.)"
)
LINK_ALREADY = "두 계정은 이미 연결되어 있어요. (These accounts are already linked.)"
LINK_OTHER_PERSON = (
    "두 계정이 이미 각각 다른 계정과 연결되어 있어요. 한쪽에서 먼저 /unlink 해 주세요. "
    "(Both accounts are linked elsewhere already; /unlink one of them first.)"
)
LINK_DONE = (
    "계정을 연결했어요! 이제 {platforms}에서 나누는 대화가 한 사람의 대화로 이어지고, "
    "/export 와 /forget 은 연결된 모든 계정을 다뤄요. 되돌리려면 /unlink 를 보내세요. "
    "(Accounts linked: {platforms}. The conversation follows you; /export and /forget cover "
    "every linked account; /unlink undoes it.)"
)
LINK_NEEDS_USER_SCOPE = (
    "참고: 대화가 플랫폼을 넘어 이어지려면 관리자가 KOBOT_CONTEXT_SCOPE=user 로 설정해야 해요. "
    "(Note: the conversation follows you across platforms only with KOBOT_CONTEXT_SCOPE=user.)"
)
UNLINK_DONE = (
    "이 계정의 연결을 해제했어요. 이제 이 계정은 따로 대화해요. 함께 나눈 대화 기록은 연결된 다른 "
    "계정에 남아요. (This account is unlinked and talks on its own again; the shared history "
    "stays with your other account.)"
)
UNLINK_NOTHING = (
    "이 계정은 다른 계정과 연결되어 있지 않아요. (This account is not linked to another one.)"
)
