"""Schema migrations: the append-only history that brings any older database file to the declared schema.

``MIGRATIONS`` is an append-only list. ``schema_migrations`` records which ran; opening a database for writing
applies the missing ones in order inside one transaction (:meth:`autoexplain.agent.store.db.Store`). A database
written by a newer autoexplain is refused. The statements of a migration that has shipped never change: a change
of schema is a new migration (a new table's DDL is what :func:`autoexplain.agent.store.schema.create_table`
prints, pasted as text) plus the matching edit of its declaration in :mod:`autoexplain.agent.store.schema` (a
test checks the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


_V1 = (
    """create table runs (
        run_id varchar primary key,
        kind varchar not null,              -- demo | zoo | label | harvest | circuit | plan | bench
        status varchar not null,            -- running | done | failed | interrupted
        policy varchar,                     -- offline | llm
        config json,                        -- the run's arguments (never secrets)
        summary json,                       -- what the run produced, filled in at the end
        started_at timestamp not null,
        finished_at timestamp,
        host varchar,
        version varchar
    )""",
    """create table work_items (
        item_id varchar primary key,        -- stable: derived from the run plan, so resume finds it
        run_id varchar not null,
        kind varchar not null,              -- feature | circuit
        target varchar not null,            -- 'sae_id#index' or a task name
        status varchar not null,            -- pending | running | done | failed | budget_limited
        attempts integer not null default 0,
        error varchar,
        budget json,                        -- steps, tokens and seconds used
        started_at timestamp,
        finished_at timestamp
    )""",
    """create table tool_calls (
        call_id varchar primary key,
        run_id varchar not null,
        item_id varchar,
        tool varchar not null,
        args json,
        summary varchar,                    -- the bounded summary the LLM saw
        error varchar,
        duration_s double,
        cache_key varchar,                  -- (model, sae, tool, args) hash: a resumed item reuses the result
        created_at timestamp not null
    )""",
    """create table models (
        model_id varchar primary key,
        spec varchar not null,
        info json
    )""",
    """create table saes (
        sae_id varchar primary key,         -- content hash of the SAE weights
        spec varchar not null,
        model_id varchar,
        hook_name varchar not null,
        site varchar not null,              -- e.g. resid_post.1
        d_in integer not null,
        d_sae integer not null,
        architecture varchar,
        info json
    )""",
    """create table features (
        sae_id varchar not null,
        feature_index integer not null,
        density double,                     -- fraction of harvested tokens where the feature fires
        max_act double,
        mean_act double,                    -- mean over firing tokens
        n_tokens bigint,                    -- tokens harvested
        is_dead boolean,
        histogram json,
        top_logits json,                    -- tokens the feature's decoder direction promotes most
        bottom_logits json,
        run_id varchar,
        primary key (sae_id, feature_index)
    )""",
    """create table feature_examples (
        sae_id varchar not null,
        feature_index integer not null,
        kind varchar not null,              -- top | quantile | random
        example_id integer not null,
        quantile integer,                   -- bin for quantile samples
        split varchar,                      -- explain | score: which side of the held-out split
        tokens json,                        -- the window's token strings
        acts json,                          -- per-token activations
        max_act double,
        window_index bigint,
        run_id varchar,
        primary key (sae_id, feature_index, kind, example_id)
    )""",
    """create table hypotheses (
        hypothesis_id varchar primary key,
        run_id varchar not null,
        item_id varchar not null,
        text varchar not null,
        status varchar not null,            -- open | confirmed | refuted | inconclusive
        causal_level varchar,               -- association | intervention | counterfactual
        evidence json,                      -- tool call ids
        created_at timestamp not null,
        updated_at timestamp
    )""",
    """create table explanations (
        explanation_id varchar primary key,
        run_id varchar not null,
        item_id varchar not null,
        target varchar not null,
        text varchar not null,
        author varchar not null,            -- policy name
        llm_model varchar,
        causal_level varchar not null,
        evidence json,
        is_final boolean not null default false,
        budget_limited boolean not null default false,
        created_at timestamp not null
    )""",
    """create table scores (
        score_id varchar primary key,
        explanation_id varchar not null,
        metric varchar not null,            -- correctness | completeness | succinctness | detection | ...
        value double,
        n integer,
        details json,                       -- ablation, patch type, metric, judge ... whatever the value depends on
        created_at timestamp not null
    )""",
    """create table circuits (
        circuit_id varchar primary key,
        run_id varchar not null,
        item_id varchar,
        model_id varchar not null,
        task varchar not null,
        method varchar not null,            -- eap | eap-ig | acdc
        ablation varchar not null,          -- resample | mean | zero
        patch_type varchar not null,        -- edge | path
        metric varchar not null,
        threshold double,
        top_k integer,
        n_edges_total integer,
        n_edges integer,
        faithfulness double,
        details json,
        created_at timestamp not null
    )""",
    """create table circuit_edges (
        circuit_id varchar not null,
        edge varchar not null,              -- 'a0.3->a1.2.k'
        src varchar not null,
        dst varchar not null,
        score double,
        in_circuit boolean not null,
        rank integer,
        primary key (circuit_id, edge)
    )""",
    """create view best_explanations as
        with ranked as (
            select e.*, s.value as correctness,
                   row_number() over (partition by e.target
                                      order by s.value desc nulls last, e.created_at desc) as rk
            from explanations e
            left join scores s on s.explanation_id = e.explanation_id and s.metric = 'correctness'
        )
        select r.target, r.explanation_id, r.text, r.author, r.causal_level, r.correctness,
               (select value from scores c where c.explanation_id = r.explanation_id
                and c.metric = 'completeness' limit 1) as completeness,
               (select value from scores c where c.explanation_id = r.explanation_id
                and c.metric = 'succinctness' limit 1) as succinctness,
               r.run_id, r.created_at
        from ranked r where r.rk = 1""",
)

_V2 = (
    """create table judgements (
        judgement_id varchar primary key,   -- hash of (explanation, scorer, judge, example, variant)
        explanation_id varchar not null,
        sae_id varchar not null,
        feature_index integer not null,
        scorer varchar not null,            -- detection | fuzzing | simulation | embedding
        judge varchar not null,             -- lexical | embedding:<model> | llm:<model>
        example_kind varchar not null,      -- top | quantile | random (feature_examples.kind)
        example_id integer not null,        -- feature_examples.example_id
        split varchar not null,             -- always 'score': judged examples come from the held-out side
        truth boolean not null,             -- detection: the context activates; fuzzing: the true firing tokens
                                            -- are highlighted
        prediction boolean,                 -- the judge's answer; null when ok is false
        ok boolean not null,                -- false: the judge failed (unparseable reply, API error)
        error varchar,
        raw json,                           -- what the judge saw and said (similarity, reply, highlights)
        created_at timestamp not null
    )""",
)

_V3 = (
    """create table tool_cache (
        cache_key varchar primary key,      -- sha256 of (model, SAEs, tool, canonical arguments)
        tool varchar not null,
        output json not null,               -- the tool's full output model, as JSON
        created_at timestamp not null
    )""",
    """create table llm_calls (
        llm_call_id varchar primary key,
        run_id varchar not null,
        item_id varchar,
        purpose varchar not null,           -- plan | explain | judge ...
        model varchar not null,
        attempt integer not null,
        ok boolean not null,
        cached boolean not null default false,
        prompt_tokens integer,
        completion_tokens integer,
        duration_s double,
        finish_reason varchar,
        error varchar,                      -- never holds an API key
        request_hash varchar,
        created_at timestamp not null
    )""",
    """create table llm_cache (
        request_hash varchar primary key,   -- sha256 of (model, messages, tools, response format)
        response json not null,             -- the completion as the API returned it
        created_at timestamp not null
    )""",
    """alter table explanations add column overall double""",
    """alter table explanations add column judge varchar""",
    """drop view best_explanations""",
    # the final explanation of each target (the agent's choice), else the best by overall score; one row per
    # target and judge, so explanations scored by different judges are never compared
    """create view best_explanations as
        with s as (
            select explanation_id, details->>'judge' as judge,
                   max(value) filter (where metric = 'correctness') as correctness,
                   max(value) filter (where metric = 'completeness') as completeness,
                   max(value) filter (where metric = 'succinctness') as succinctness
            from scores group by all
        ), ranked as (
            select e.target, e.explanation_id, e.text, e.author, e.causal_level, coalesce(s.judge, e.judge) as judge,
                   s.correctness, s.completeness, s.succinctness, e.overall, e.is_final, e.budget_limited,
                   e.run_id, e.created_at,
                   row_number() over (partition by e.target, coalesce(s.judge, e.judge)
                                      order by e.is_final desc, e.overall desc nulls last,
                                               s.correctness desc nulls last, e.created_at desc) as rk
            from explanations e left join s using (explanation_id)
        )
        select * exclude (rk) from ranked where rk = 1""",
)

# per-example judgements stored a set at a time: one row per (explanation, scorer, judge) with the per-example
# values as parallel lists (a feature's ~100 decisions cost one row to write instead of 100); the view
# ``judgements`` unnests them into the per-example rows of v2, so queries read it as before
_JUDGEMENTS_VIEW = """create view judgements as
        select unnest(judgement_ids) as judgement_id, explanation_id, sae_id, feature_index, scorer, judge,
               unnest(example_kinds) as example_kind, unnest(example_ids) as example_id, unnest(splits) as split,
               unnest(truths) as truth, unnest(predictions) as prediction, unnest(oks) as ok,
               unnest(errors) as error, unnest(raws::json[]) as raw, created_at
        from judgement_sets"""
_V4 = (
    """create table judgement_sets (
        explanation_id varchar not null,
        scorer varchar not null,            -- detection | fuzzing | simulation | embedding
        judge varchar not null,             -- lexical:<lexicon> | embedding:<model> | llm:<model>
        sae_id varchar not null,
        feature_index integer not null,
        judgement_ids varchar[] not null,   -- one entry per judged example, all lists in the same order
        example_kinds varchar[] not null,   -- feature_examples.kind
        example_ids integer[] not null,     -- feature_examples.example_id
        splits varchar[] not null,          -- always 'score'
        truths boolean[] not null,
        predictions boolean[] not null,     -- an entry is null when that example's ok is false
        oks boolean[] not null,
        errors varchar[] not null,
        raws json not null,                 -- a JSON array: what the judge saw and said, per example
        created_at timestamp not null,
        primary key (explanation_id, scorer, judge)
    )""",
    """insert into judgement_sets
        select explanation_id, scorer, judge, any_value(sae_id), any_value(feature_index),
               list(judgement_id order by judgement_id), list(example_kind order by judgement_id),
               list(example_id order by judgement_id), list(split order by judgement_id),
               list(truth order by judgement_id), list(prediction order by judgement_id),
               list(ok order by judgement_id), list(error order by judgement_id),
               to_json(list(raw order by judgement_id)), min(created_at)
        from judgements group by explanation_id, scorer, judge""",
    """drop table judgements""",
    _JUDGEMENTS_VIEW,
)

# which harvest each feature row comes from, and what each harvest was run on (reuse checks its inputs); version 5
# is llm_calls' columns
_V6 = (
    """create table harvests (
    harvest_id varchar not null primary key,  -- hash of model, SAE, dataset identity and every argument
    sae_id varchar not null,
    model_id varchar,
    dataset varchar,  -- the dataset's path or hub name
    inputs json not null,  -- model, sae, dataset identity, n_tokens asked, ctx: what reuse compares
    n_tokens bigint,  -- tokens harvested (BOS and padding excluded)
    n_windows bigint,
    note varchar,  -- a warning about the inputs, e.g. a dataset far smaller than asked
    run_id varchar,
    created_at timestamp not null
)""",
    """alter table features add column harvest_id varchar""",
    """alter table feature_examples add column harvest_id varchar""",
)

# llm_calls: the request's shape (structured-output / tool-calling mode), the HTTP status and the retry wait of
# each attempt (the client recorded them; the store dropped them)
_V5 = (
    """alter table llm_calls add column mode varchar""",
    """alter table llm_calls add column status_code integer""",
    """alter table llm_calls add column retry_in_s double""",
)

# every spec an SAE was loaded under, so users name features by the spec they typed (toy:small/res0#7) and not only
# by the content hash (sae-…#7); the SAEs already stored keep the one spec ``saes`` recorded
_V7 = (
    """create table sae_aliases (
    spec varchar not null,  -- the spec as typed, or the absolute path of a folder spec
    sae_id varchar not null,
    model_id varchar,
    seen_at timestamp not null,  -- when an SAE was last loaded under this spec
    primary key (spec, sae_id)
)""",
    """insert into sae_aliases select spec, sae_id, model_id, current_timestamp from saes""",
)

# mechanisms (issue #13) and claims capped by evidence (issue #14): circuits record necessity next to faithfulness
# (sufficiency), held-out faithfulness and robustness; circuit nodes their role, its check and causal mediation;
# head roles per model; causal-tracing grids; explanations the causal level their cited calls support
_V8 = (
    """create table circuit_nodes (
    circuit_id varchar not null,
    node varchar not null,  -- 'a1.2', 'm0'
    in_circuit boolean not null,
    role varchar,  -- the role the explanation claims (head_roles.role vocabulary)
    role_score double,  -- the detector's score for that role, 0..1
    role_verified boolean,  -- the role's intervention check; null: not checked or could not run
    total_effect double,  -- TE = m(M) - m(every outgoing edge noised), metric units
    direct_effect double,  -- NDE: only the edge to the logits noised
    indirect_effect double,  -- NIE: every outgoing edge but the one to the logits noised
    interaction double,  -- TE - NDE - NIE: zero where the paths combine linearly
    mediation_ratio double,  -- NIE / TE; null when TE is too small to divide by
    prompt_share double,  -- share of prompts on which noising the node moves the metric toward the corrupt run
    details json,
    primary key (circuit_id, node)
)""",
    """create table head_roles (
    model_id varchar not null,
    node varchar not null,  -- 'a1.2'
    role varchar not null,  -- previous_token | duplicate_token | induction | copying | suppression | attends_bos
    score double,  -- 0..1; null: could not be computed (details say why)
    is_best boolean not null default false,  -- this is the head's best role, above the cut
    details json,  -- technique, sequences and positions used, raw values
    run_id varchar,
    created_at timestamp not null,
    primary key (model_id, node, role)
)""",
    """create table causal_traces (
    trace_id varchar not null primary key,
    run_id varchar,
    model_id varchar not null,
    task varchar,  -- the task or prompt set traced
    noise double,  -- noise scale: standard deviations of the token embeddings
    n_samples integer,  -- noise samples per prompt
    restore_window integer,  -- layers restored together around each cell (attn and mlp states)
    p_clean double,  -- answer probability on the clean prompts
    p_corrupted double,  -- answer probability with the subject noised
    details json,
    created_at timestamp not null
)""",
    """create table causal_trace_cells (
    trace_id varchar not null,
    state varchar not null,  -- resid | attn | mlp
    layer integer not null,
    pos integer not null,  -- the grid column: a token position, or a position role when prompts differ
    label varchar,  -- the column's label: "3 ' owl'" (position) or 'last subject' (role)
    site varchar,  -- the state restored, e.g. mlp_out.0 (a window's centre layer)
    effect double,  -- p_restored(answer) - p_corrupted(answer), mean over samples and prompts
    normalized double,  -- effect / (p_clean - p_corrupted)
    primary key (trace_id, state, layer, pos)
)""",
    """alter table circuits add column necessity double""",
    """alter table circuits add column held_out_faithfulness double""",
    """alter table circuits add column robustness_jaccard double""",
    """alter table circuits add column robustness_spearman double""",
    """alter table explanations add column supported_level varchar""",
    """alter table explanations add column overclaimed boolean""",
    """create or replace view best_explanations as
        with s as (
            select explanation_id, details->>'judge' as judge,
                   max(value) filter (where metric = 'correctness') as correctness,
                   max(value) filter (where metric = 'completeness') as completeness,
                   max(value) filter (where metric = 'succinctness') as succinctness
            from scores group by all
        ), ranked as (
            select e.target, e.explanation_id, e.text, e.author, e.causal_level, coalesce(s.judge, e.judge) as judge,
                   s.correctness, s.completeness, s.succinctness, e.overall, e.is_final, e.budget_limited,
                   e.run_id, e.created_at, e.supported_level, e.overclaimed,
                   row_number() over (partition by e.target, coalesce(s.judge, e.judge)
                                      order by e.is_final desc, e.overall desc nulls last,
                                               s.correctness desc nulls last, e.created_at desc) as rk
            from explanations e left join s using (explanation_id)
        )
        select * exclude (rk) from ranked where rk = 1""",
)

_V9 = (
    """create table feature_circuits (
    feature_circuit_id varchar not null primary key,
    run_id varchar not null,
    item_id varchar,  -- the work item that found it (agent runs); null: the CLI
    model_id varchar not null,
    task varchar not null,
    saes varchar[] not null,  -- sae_ids in forward order
    sites varchar[] not null,  -- their sites, e.g. resid_post.0
    metric varchar not null,
    ablation varchar not null,  -- resample: nodes outside take their corrupt-prompt values
    per_position boolean not null,  -- one node per (feature, position) instead of summed
    steps integer,  -- integrated-gradient steps
    node_threshold double,  -- kept nodes: |effect| >= this x |m(M) - m(empty)|
    edge_threshold double,  -- kept edges: |weight| >= this x |m(M) - m(empty)|
    n_prompts integer,
    m_clean double,  -- m(M): the model (SAEs spliced, error terms kept)
    m_ablated double,  -- m(empty): every node at its corrupt value
    n_nodes integer,  -- nodes kept
    n_nodes_total integer,
    n_edges integer,  -- edges kept
    faithfulness double,  -- sufficiency F(C) = (m(C) - m(empty)) / (m(M) - m(empty))
    necessity double,  -- 1 - F(M minus C)
    completeness double,  -- max(0, 1 - worst |F(C minus K) - F(M minus K)|) over knock-outs K
    held_out_faithfulness double,  -- F(C) on prompts the search never saw; null: no held-out split
    details json,
    created_at timestamp not null
)""",
    """create table feature_circuit_nodes (
    feature_circuit_id varchar not null,
    node varchar not null,  -- 'embed', 'SAE_ID#12', 'SAE_ID#err', with '@POS' for per-position nodes
    kind varchar not null,  -- embed | feature | error
    sae_id varchar,
    feature_index integer,  -- features only
    site varchar,
    position integer,  -- null: summed over positions
    effect double,  -- IG estimate of m(clean) - m(node at its corrupt value)
    activation double,  -- clean activation (features): summed over positions, mean over prompts
    in_circuit boolean not null,
    primary key (feature_circuit_id, node)
)""",
    """create table feature_circuit_edges (
    feature_circuit_id varchar not null,
    src varchar not null,
    dst varchar not null,  -- a node, or 'logits'
    weight double,  -- linear approximation of src's effect through dst, directly
    in_circuit boolean not null,
    primary key (feature_circuit_id, src, dst)
)""",
)

MIGRATIONS: tuple[Migration, ...] = (Migration(1, "initial schema", _V1),
                                     Migration(2, "judgements: one row per per-example judge decision", _V2),
                                     Migration(3, "agent: tool cache, LLM calls and cache, overall scores, "
                                                  "best_explanations per judge", _V3),
                                     Migration(4, "judgements stored a set at a time (judgement_sets); "
                                                  "judgements becomes a view", _V4),
                                     Migration(5, "llm_calls: mode, HTTP status and retry wait per attempt", _V5),
                                     Migration(6, "harvests: what each harvest was run on; features and "
                                                  "feature_examples record their harvest_id", _V6),
                                     Migration(7, "sae_aliases: every spec an SAE was loaded under", _V7),
                                     Migration(8, "mechanisms: circuit necessity, held-out and robustness; "
                                                  "circuit_nodes, head_roles, causal traces; explanations' "
                                                  "supported causal level", _V8),
                                     Migration(9, "sparse feature circuits: feature_circuits, feature_circuit_nodes, "
                                                  "feature_circuit_edges", _V9))
