"""Incremental detokenization with stop strings held back across token boundaries."""

from nvfp4.serve.interface import SamplingParams


class TextStream:
    """Feeds generated token ids, returns text deltas that never contain (part of) a stop string."""

    def __init__(self, tokenizer, prompt_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-6:])  # a little context so leading spaces decode as in the full text
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.stops = [s for s in params.stop if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text, self.emitted = "", 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int, check_stop: bool = True) -> tuple[str, bool]:
        """-> (text delta, hit a stop string)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return "", False
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if check_stop and self.stops:
            start = max(0, self.emitted - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                return self._emit(min(hits)), True
        return self._emit(len(self.text) - self.hold if self.stops else len(self.text)), False

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta, self.emitted = self.text[self.emitted : end], end
        return delta

    def flush(self) -> str:
        """The held-back tail, once the request ends for a reason other than a stop string."""
        return self._emit(len(self.text))
