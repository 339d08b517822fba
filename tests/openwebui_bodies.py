"""Request bodies as Open WebUI sends them to an OpenAI-compatible connection, for the replay test.

Open WebUI (0.6.x) with native function calling sends its built-in tools with every chat, streams, and asks for
usage in the stream; after a chat it sends two background tasks, a title and tags, each one user message holding
its task prompt with the chat pasted in, not streamed. The task prompts below are its defaults
(`DEFAULT_TITLE_GENERATION_PROMPT_TEMPLATE`, `DEFAULT_TAGS_GENERATION_PROMPT_TEMPLATE`) with the chat filled in, as
the client's data, quoted so the replay sends what it sends; `metadata` is Open WebUI's own and is removed before
the request leaves it.
"""

from __future__ import annotations

from typing import Any

QUESTION = "What should I pack for a weekend hiking trip in the Alps?"
ANSWER = "Pack layers, a rain jacket, sturdy boots, water, snacks, a map and sun protection."


def _function(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    parameters = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


BUILTIN_TOOLS = [
    _function("get_current_timestamp", "Get the current Unix timestamp and the current date and time in ISO format.",
              {}, []),
    _function("calculate_timestamp", "Get the Unix timestamp and ISO date for a time relative to now.",
              {"days_ago": {"type": "integer", "description": "Days before now (default 0)"},
               "weeks_ago": {"type": "integer", "description": "Weeks before now (default 0)"},
               "months_ago": {"type": "integer", "description": "Months before now (default 0)"},
               "years_ago": {"type": "integer", "description": "Years before now (default 0)"}}, []),
    _function("search_web", "Search the public web for information. Best for current events, external references, "
              "or topics not covered in internal documents.",
              {"query": {"type": "string", "description": "The search query to look up"},
               "count": {"type": "integer", "description": "Number of results to return (default 5)"}}, ["query"]),
    _function("fetch_url", "Fetch and extract the main text content from a web page URL.",
              {"url": {"type": "string", "description": "The URL to fetch content from"}}, ["url"]),
    _function("search_memories", "Search the user's stored memories for information relevant to the query.",
              {"query": {"type": "string", "description": "The search query"},
               "count": {"type": "integer", "description": "Number of memories to return (default 5)"}}, ["query"]),
    _function("add_memory", "Store a new memory about the user for future conversations.",
              {"content": {"type": "string", "description": "The memory content to store"}}, ["content"]),
    _function("search_knowledge_files", "Search the knowledge bases and files attached to this chat.",
              {"query": {"type": "string", "description": "The search query"},
               "count": {"type": "integer", "description": "Number of results (default 5)"}}, ["query"]),
]  # fmt: skip

STREAMED = {"stream": True, "stream_options": {"include_usage": True}}


def chat(model: str) -> dict[str, Any]:
    """The first message of a new chat."""
    return {**STREAMED, "model": model, "messages": [{"role": "user", "content": QUESTION}], "tools": BUILTIN_TOOLS}


def chat_after_a_tool_call(model: str) -> dict[str, Any]:
    """The same chat once a tool ran: Open WebUI sends the call (with empty content) and its result back."""
    call = {"id": "call_owui_1", "type": "function",
            "function": {"name": "get_current_timestamp", "arguments": "{}"}}  # fmt: skip
    return {
        **STREAMED, "model": model, "tools": BUILTIN_TOOLS,
        "messages": [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_owui_1",
             "content": '{"current_timestamp": 1790000000, "current_iso": "2026-09-21T12:00:00"}'},
        ],
    }  # fmt: skip


def _history(*turns: tuple[str, str]) -> str:
    return "\n".join(f"{role.upper()}: {text}" for role, text in turns)


TITLE_PROMPT = """### Task:
Generate a concise, 3-5 word title with an emoji summarizing the chat history.
### Guidelines:
- The title should clearly represent the main theme or subject of the conversation.
- Use emojis that enhance understanding of the topic, but avoid quotation marks or special formatting.
- Write the title in the chat's primary language; default to English if multilingual.
- Prioritize accuracy over excessive creativity; keep it clear and simple.
- Your entire response must consist solely of the JSON object, without any introductory or concluding text.
- The output must be a single, raw JSON object, without any markdown code fences or other encapsulating text.
- Ensure no conversational text, affirmations, or explanations precede or follow the raw JSON output, as this will cause direct parsing failure.
### Output:
JSON format: { "title": "your concise title here" }
### Examples:
- { "title": "📉 Stock Market Trends" },
- { "title": "🍪 Perfect Chocolate Chip Recipe" },
- { "title": "Evolution of Music Streaming" },
- { "title": "Remote Work Productivity Tips" },
- { "title": "Artificial Intelligence in Healthcare" },
- { "title": "🎮 Video Game Development Insights" }
### Chat History:
<chat_history>
{history}
</chat_history>"""

TAGS_PROMPT = """### Task:
Generate 1-3 broad tags categorizing the main themes of the chat history, along with 1-3 more specific subtopic tags.

### Guidelines:
- Start with high-level domains (e.g. Science, Technology, Philosophy, Arts, Politics, Business, Health, Sports, Entertainment, Education)
- Consider including relevant subfields/subdomains if they are strongly represented throughout the conversation
- If content is too short (less than 3 messages) or too diverse, use only ["General"]
- Use the chat's primary language; default to English if multilingual
- Prioritize accuracy over specificity

### Output:
JSON format: { "tags": ["tag1", "tag2", "tag3"] }

### Chat History:
<chat_history>
{history}
</chat_history>"""


def title_task(model: str, max_completion_tokens: int) -> dict[str, Any]:
    content = TITLE_PROMPT.replace("{history}", _history(("user", QUESTION), ("assistant", ANSWER)))
    return {"model": model, "messages": [{"role": "user", "content": content}], "stream": False,
            "max_completion_tokens": max_completion_tokens}  # fmt: skip


def tags_task(model: str) -> dict[str, Any]:
    content = TAGS_PROMPT.replace("{history}", _history(("user", QUESTION), ("assistant", ANSWER)))
    return {"model": model, "messages": [{"role": "user", "content": content}], "stream": False}
