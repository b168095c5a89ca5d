"""Cheap orientation tools: what the model is, and how texts tokenise.

Neither supports any causal claim: they describe the setup. ``tokenize`` matters for hypothesis tests, whose
probe texts must put the word under test in one token where the hypothesis is about a token.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from autoexplain.tools.registry import Cost, ToolContext, ToolOutput, ToolSpec
from autoexplain.tools.vocab import Site


class ModelInfoIn(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelInfoOut(ToolOutput):
    model_id: str
    architecture: str
    n_layers: int
    n_heads: int
    d_model: int
    d_vocab: int
    n_ctx: int
    attn_only: bool
    sites: list[Site] = Field(description="every site the tools can read or patch, checked to fire")
    saes: list[dict[str, object]]

    def summary_text(self) -> str:
        kinds = sorted({s.kind.value for s in self.sites})
        saes = "; ".join(f"{s['sae_id']} at {s['site']} (d_sae {s['d_sae']})" for s in self.saes) or "none"
        return (f"model {self.model_id} ({self.architecture}): {self.n_layers} layers x {self.n_heads} heads, "
                f"d_model {self.d_model}, vocab {self.d_vocab}, context {self.n_ctx}"
                f"{', attention-only' if self.attn_only else ''}. Site kinds: {', '.join(kinds)} "
                f"(write KIND.LAYER or KIND.LAYER.HEAD). SAEs: {saes}.")


def model_info(ctx: ToolContext, args: ModelInfoIn) -> ModelInfoOut:
    lm = ctx.model
    d = lm.describe()
    return ModelInfoOut(model_id=lm.model_id, architecture=str(d["architecture"]), n_layers=lm.n_layers,
                        n_heads=lm.n_heads, d_model=lm.d_model, d_vocab=int(d["d_vocab"]), n_ctx=lm.n_ctx,
                        attn_only=lm.attn_only, sites=lm.sites(),
                        saes=[s.describe() for s in ctx.saes.values()])


class TokenizeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(min_length=1, max_length=64, description="texts to tokenise (1-64)")
    prepend_bos: bool = Field(default=True, description="prepend the BOS token as the model's tools do")


class TokenizedText(BaseModel):
    text: str
    tokens: list[str]
    ids: list[int]


class TokenizeOut(ToolOutput):
    items: list[TokenizedText]

    def summary_text(self) -> str:
        shown, per_text = 8, 16
        lines = [f"{it.text[:60]!r} -> {len(it.tokens)} tokens: {' | '.join(it.tokens[:per_text])}"
                 + (" …" if len(it.tokens) > per_text else "") for it in self.items[:shown]]
        more = f"\n(+{len(self.items) - shown} more texts)" if len(self.items) > shown else ""
        return "\n".join(lines) + more


def tokenize(ctx: ToolContext, args: TokenizeIn) -> TokenizeOut:
    lm = ctx.model
    tok = lm.tokenizer
    items = []
    for text in args.texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if args.prepend_bos:
            ids = [tok.bos_token_id, *ids]
        items.append(TokenizedText(text=text, ids=ids, tokens=[tok.decode([i]) for i in ids]))
    return TokenizeOut(items=items)


TOOLS = (
    ToolSpec(name="model_info", level=None,
             input_model=ModelInfoIn, output_model=ModelInfoOut, fn=model_info, cost=Cost.CHEAP,
             description="Describe the model under study: layers, heads, widths, context length, the sites tools "
                         "can read or patch, and the loaded SAEs. Descriptive only: supports no causal claim."),
    ToolSpec(name="tokenize", level=None,
             input_model=TokenizeIn, output_model=TokenizeOut, fn=tokenize, cost=Cost.CHEAP,
             description="Show how texts split into the model's tokens (with ids). Use it before writing probe "
                         "texts, so the word a hypothesis is about is one token. Descriptive only."),
)
