"""The GPT-2 tokenizer: decoding from gpt2_tokenizer.bin (llm.c's llmc/tokenizer.h: the trainers only
decode), and tiktoken's encoder for the scripts that make data and the exporter."""

from llmc.formats import read_tokenizer_file
from llmc.utils import FormatError


def gpt2_encoding():
    """tiktoken's GPT-2 encoding, for the prepro scripts and the exporter (the trainers only decode).
    tiktoken downloads its two files on first use; without a network that fails deep inside
    requests, so say in one line what to do instead."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests' connection errors, or whatever the download raised
        raise SystemExit(f"tiktoken could not load the gpt2 encoding ({type(e).__name__}: no network?); "
                         "offline, point TIKTOKEN_CACHE_DIR at a filled cache, e.g. "
                         "export TIKTOKEN_CACHE_DIR=$PWD/../shared/data/tiktoken_cache") from None


class Tokenizer:
    def __init__(self, path):
        self.init_ok = False
        self.tokens, self.eot_token = [], 50256
        try:
            self.tokens, self.eot_token = read_tokenizer_file(path)
            self.init_ok = True
        except (OSError, FormatError) as e:
            print(f"WARNING: failed to read the tokenizer ({e}); samples print as token ids")

    def decode_bytes(self, token_id):
        return self.tokens[token_id]

    def decode(self, token_id):
        """The token's text. A token may hold part of a UTF-8 character: that part shows as U+FFFD
        here; print through an incremental decoder (as main does) to keep such characters whole."""
        return self.tokens[token_id].decode("utf-8", errors="replace")
