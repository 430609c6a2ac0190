"""Finding the server and what it takes: its root URL, its models, its vocabulary, its refusals."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from bench import runner
from bench.config import ConfigError, WorkloadConfig
from bench.targets import (
    Server,
    TargetError,
    _model_cards,
    _vocab_size,
    api_root,
    refusal_hint,
)
from bench.workload import within_vocabulary


@pytest.mark.parametrize(
    "given",
    [
        "http://127.0.0.1:8000",
        "http://127.0.0.1:8000/",
        "http://127.0.0.1:8000/v1",
        "http://127.0.0.1:8000/v1/",
    ],
)
def test_the_openai_sdks_base_url_form_ending_in_v1_names_the_same_server(given: str) -> None:
    assert api_root(given) == "http://127.0.0.1:8000"


def test_a_base_url_with_another_path_keeps_it() -> None:
    assert api_root("https://example.test/serving/llama") == "https://example.test/serving/llama"


@pytest.fixture
def not_found_url() -> Iterator[str]:
    """A web server that answers 404 to everything, as a non-OpenAI path does."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/api"
    httpd.shutdown()
    httpd.server_close()


def test_a_404_from_the_models_list_names_the_url_tried(not_found_url: str) -> None:
    with pytest.raises(TargetError) as err:
        _model_cards(not_found_url, None)
    assert f"{not_found_url}/v1/models answered HTTP 404" in str(err.value)
    assert "target.base_url" in str(err.value)


def test_the_vocabulary_size_comes_from_the_served_models_card() -> None:
    cards = [{"id": "other", "vocab_size": 99}, {"id": "tiny", "vocab_size": 2048}]
    assert _vocab_size(cards, "tiny") == 2048
    assert _vocab_size([{"id": "tiny"}], "tiny") is None
    assert _vocab_size([{"id": "tiny", "vocab_size": "2048"}], "tiny") is None


DEFAULT_IDS = WorkloadConfig(prompt_format="auto", token_id_low=1000, token_id_high=20000)


def test_prompt_token_ids_stay_below_a_small_vocabulary() -> None:
    fitted = within_vocabulary(DEFAULT_IDS, 2048)
    assert (fitted.token_id_low, fitted.token_id_high) == (1000, 2048)
    assert within_vocabulary(DEFAULT_IDS, 128256) == DEFAULT_IDS


def test_an_id_range_wholly_past_the_vocabulary_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"workload.token_id_low: .* vocabulary size 512"):
        within_vocabulary(DEFAULT_IDS, 512)


def test_the_run_learns_the_vocabulary_from_the_server_before_the_tokenizer() -> None:
    server = Server("http://127.0.0.1:1", "tiny", None, vocab_size=2048)
    assert runner._prompt_ids(DEFAULT_IDS, server, None).token_id_high == 2048

    class Tok:
        def __init__(self) -> None:
            self.vocab_size = 4096
            self.all_special_ids: list[int] = []

        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return []

        def decode(self, ids: list[int]) -> str:
            return ""

    silent = Server("http://127.0.0.1:1", "m", None)
    assert runner._prompt_ids(DEFAULT_IDS, silent, Tok()).token_id_high == 4096
    assert runner._prompt_ids(DEFAULT_IDS, silent, None) == DEFAULT_IDS


@pytest.mark.parametrize(
    ("status", "message", "wanted", "unwanted"),
    [
        (400, "prompt token ids must be in [0, 2048)", "workload.token_id_high", "ignore_eos"),
        (
            400,
            "Unrecognized request argument supplied: ignore_eos",
            "target.ignore_eos=false",
            "token_id",
        ),
        (
            400,
            "stream_options.continuous_usage_stats is not supported",
            "target.continuous_usage_stats=false",
            "ignore_eos",
        ),
        (404, "The model `gpt-9` does not exist.", "target.model", "ignore_eos"),
        (401, "Unauthorized", "target.api_key", "ignore_eos"),
        (
            400,
            "This model's maximum context length is 2048 tokens",
            "scenario.input_tokens",
            "ignore_eos",
        ),
    ],
)
def test_the_hint_follows_the_servers_message(
    status: int, message: str, wanted: str, unwanted: str
) -> None:
    hint = refusal_hint(status, message)
    assert wanted in hint and unwanted not in hint
