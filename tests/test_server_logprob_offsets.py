"""Text completions' `text_offset`: where each token starts in the text, counted in the text's characters."""

from __future__ import annotations

from sealbox.runtime.engine import TokenLogprob
from sealbox.runtime.server.choices import completion_logprobs


def _items(*pieces: bytes) -> list[TokenLogprob]:
    return [TokenLogprob(token=index, piece=piece, logprob=-0.5) for index, piece in enumerate(pieces)]


def test_whole_tokens_start_where_the_ones_before_them_end() -> None:
    assert completion_logprobs(_items(b"the", b" water", b" is"), offset=4)["text_offset"] == [4, 7, 13]


def test_the_byte_tokens_of_one_character_all_start_at_it_and_count_as_one_character() -> None:
    flamingo = "🦩".encode()
    logprobs = completion_logprobs(_items(b" ", *(flamingo[i : i + 1] for i in range(4)), b"\n"))
    text = " 🦩\n"
    assert logprobs["text_offset"] == [0, 1, 1, 1, 1, 2]
    assert text[logprobs["text_offset"][-1]] == "\n"


def test_a_character_split_unevenly_counts_once_from_its_first_byte() -> None:
    euro = "€".encode()
    assert completion_logprobs(_items(euro[:2], euro[2:] + b"5", b"!"))["text_offset"] == [0, 0, 2]
