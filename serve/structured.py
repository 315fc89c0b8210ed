"""Constrained decoding with xgrammar (vLLM's default backend): a request's Constraint (a JSON schema, a regex, a
list of choices or an EBNF grammar) becomes a compiled grammar, cached per tokenizer and spec, and each sequence a
Guide that masks its logits row before sampling and accepts the sampled token after."""

from __future__ import annotations

import json
import re
import threading
import weakref
from dataclasses import dataclass

KINDS = ("json", "regex", "choice", "grammar")
ANY_OBJECT = '{"type": "object"}'  # response_format json_object
_COMPILERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {(vocab, stops): compiler}
_COMPILERS_LOCK = threading.Lock()


class ConstraintError(ValueError):
    """A spec xgrammar cannot turn into a grammar (the client's mistake: a 400)."""

    status = 400


class GrammarStuck(ConstraintError):
    """The grammar goes on with a character no token of the vocabulary can spell (a regex's astral character, say):
    the answer cannot continue. The client's grammar is at fault: a 400."""


@dataclass(frozen=True)
class Constraint:
    kind: str  # one of KINDS
    spec: str  # JSON schema text | regex | JSON list of the choices | EBNF grammar (root rule `root`)

    @staticmethod
    def json_schema(schema: dict | str | None) -> Constraint:
        text = ANY_OBJECT if schema is None else schema if isinstance(schema, str) else json.dumps(schema)
        return Constraint("json", text)

    @staticmethod
    def choice(options: list[str]) -> Constraint:
        return Constraint("choice", json.dumps(list(options)))


def _xgr():
    import xgrammar

    return xgrammar


def _grammar(constraint: Constraint):
    """The constraint as an xgrammar Grammar (no tokenizer needed): the one place a spec is parsed."""
    xgr = _xgr()
    try:
        if constraint.kind == "json":
            return xgr.Grammar.from_json_schema(constraint.spec, any_whitespace=False)
        if constraint.kind == "regex":
            return xgr.Grammar.from_regex(constraint.spec)
        if constraint.kind == "choice":
            return xgr.Grammar.from_ebnf(_choice_ebnf(json.loads(constraint.spec)))
        if constraint.kind == "grammar":
            return xgr.Grammar.from_ebnf(constraint.spec)
    except (RuntimeError, ValueError, TypeError) as error:
        raise ConstraintError(f"invalid {constraint.kind} constraint: {_message(error)}") from error
    raise ConstraintError(f"unknown constraint kind {constraint.kind!r}")


def _choice_ebnf(options: list[str]) -> str:
    if not options or not all(isinstance(o, str) for o in options):
        raise ValueError("choice must be a non-empty list of strings")
    return "root ::= " + " | ".join(_ebnf_literal(o) for o in options)


def _ebnf_literal(text: str) -> str:
    escaped = "".join(
        c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"
        for c in text
    )
    return f'"{escaped}"' if text else '""'


def _message(error: Exception) -> str:
    """xgrammar's message without its `[time] /project/cpp/file.cc:line: ` prefix."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(error).strip().splitlines()[0] if str(error).strip() else "")


def check(constraint: Constraint) -> None:
    """Raise ConstraintError unless the spec makes a grammar."""
    _grammar(constraint)


def _compiler(tokenizer, vocab_size: int):
    """One xgrammar compiler per tokenizer and vocabulary width (the logits' width: a model may pad its vocabulary);
    its own cache keeps each compiled grammar, so a spec is compiled once however many requests use it."""
    xgr = _xgr()
    with _COMPILERS_LOCK:
        per_tokenizer = _COMPILERS.setdefault(tokenizer, {})
        if vocab_size not in per_tokenizer:
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
            per_tokenizer[vocab_size] = xgr.GrammarCompiler(info, max_threads=1)
        return per_tokenizer[vocab_size]


def compile_constraint(tokenizer, vocab_size: int, constraint: Constraint):
    """Through the compiler's spec methods, which its cache keys by the spec's text (a Grammar built first would be
    parsed again each time: ~5 ms a schema)."""
    compiler = _compiler(tokenizer, vocab_size)
    try:
        if constraint.kind == "json":
            return compiler.compile_json_schema(constraint.spec, any_whitespace=False)
        if constraint.kind == "regex":
            return compiler.compile_regex(constraint.spec)
        if constraint.kind == "choice":
            return compiler.compile_grammar(_choice_ebnf(json.loads(constraint.spec)))
        if constraint.kind == "grammar":
            return compiler.compile_grammar(constraint.spec)
    except (RuntimeError, ValueError, TypeError) as error:
        raise ConstraintError(f"invalid {constraint.kind} constraint: {_message(error)}") from error
    raise ConstraintError(f"unknown constraint kind {constraint.kind!r}")


def can_compile_for(tokenizer) -> bool:
    """xgrammar reads transformers' tokenizers only."""
    from transformers import PreTrainedTokenizerBase

    return isinstance(tokenizer, PreTrainedTokenizerBase)


class Guide:
    """One sequence's grammar state: mask(row) before sampling, accept(token) after; `done` once the grammar has
    ended (a stop token accepted)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: tuple[int, ...], constraint: Constraint):
        import torch

        xgr = _xgr()
        self.vocab_size = vocab_size
        self.matcher = xgr.GrammarMatcher(
            compile_constraint(tokenizer, vocab_size, constraint), override_stop_tokens=list(stop_ids)
        )
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.accepted = 0
        self._shifts = torch.arange(32, dtype=torch.int32)

    @property
    def done(self) -> bool:
        return self.matcher.is_terminated()

    def allowed(self):
        """bool [vocab]: the tokens the grammar allows next."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        bits = (self.bitmask[0][:, None] >> self._shifts) & 1  # little-endian bits of each int32 word
        return bits.flatten()[: self.vocab_size].bool()

    def mask(self, row) -> None:
        """-inf on the disallowed tokens of a logits row (in place). Should penalties (min_tokens banning the stop
        tokens, say) have left no allowed token finite, the allowed ones become equally likely."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        if not self.bitmask.any():
            raise GrammarStuck(
                f"the constraint cannot go on: no token of this model's vocabulary spells what it "
                f"requires next (after {self.accepted} tokens)"
            )
        _xgr().apply_token_bitmask_inplace(row[None], self.bitmask.to(row.device), vocab_size=self.vocab_size)
        if not row.max().isfinite():
            row.masked_fill_(self.allowed().to(row.device)[: row.shape[-1]], 0.0)

    def accept(self, token: int) -> bool:
        self.accepted += 1
        return self.matcher.accept_token(token)
