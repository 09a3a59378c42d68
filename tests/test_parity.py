"""csm's torch backend against transformers' CsmForConditionalGeneration on the same tiny random
weights: greedy codes, float32 logits of both stacks, every checkpoint layout, the teacher-forced
training forward, and seeded sampling."""

import numpy as np
import pytest
import torch

import csm
import csm_torch.frame_loop as frame_loop_module
from csm_torch import loading

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CASES = [("Hello there, how are you?", 0), ("A different sentence to speak!", 3)]
MAX_MS = 800  # 10 frames
MAX_FRAMES = 10


def load(path):
    return csm.load(path, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def gen(tiny_transformers_dir):
    return load(tiny_transformers_dir[0])


@pytest.fixture(scope="module")
def hf(tiny_transformers_dir):
    return tiny_transformers_dir[1]


def hf_greedy_codes(hf, gen, text, speaker):
    ids = torch.from_numpy(gen.prompt(text, speaker).tokens[:, -1])[None]
    with torch.no_grad():
        out = hf.generate(input_ids=ids, do_sample=False, depth_decoder_do_sample=False, max_new_tokens=MAX_FRAMES)
    return out[0].numpy()


def assert_close_rel(ours, theirs, rel=1e-4):
    scale = theirs.abs().max().item()
    assert scale > 0
    diff = (ours - theirs).abs().max().item()
    assert diff <= rel * scale, f"max abs diff {diff} > {rel} x max|logits| {scale}"


# --- (a) greedy codes -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, speaker", CASES)
def test_greedy_codes_equal_transformers_generate(gen, hf, text, speaker):
    ours = gen.generate_codes(text, speaker, topk=1, max_audio_length_ms=MAX_MS)
    theirs = hf_greedy_codes(hf, gen, text, speaker)
    assert ours.dtype == np.int64 and ours.shape[1] == 32
    assert theirs.shape[1] == 32
    n = min(len(ours), len(theirs))  # transformers may stop earlier on an all-zero frame
    assert n >= 8
    np.testing.assert_array_equal(ours[:n], theirs[:n])
    assert len(np.unique(ours[:n])) > 8  # real codes, not a degenerate constant


def test_different_texts_and_speakers_give_different_codes(gen):
    a = gen.generate_codes(*CASES[0], topk=1, max_audio_length_ms=MAX_MS)
    b = gen.generate_codes(*CASES[1], topk=1, max_audio_length_ms=MAX_MS)
    c = gen.generate_codes(CASES[0][0], 1, topk=1, max_audio_length_ms=MAX_MS)
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, c)


# --- (b) float32 logits ---------------------------------------------------------------------------

def _our_prompt_hidden(gen, text, speaker):
    m = gen._backend.model
    prompt = gen.prompt(text, speaker)
    tokens = torch.from_numpy(prompt.tokens)[None]
    mask = torch.from_numpy(prompt.mask)[None]
    positions = torch.arange(tokens.shape[1])
    with torch.no_grad():
        return m.backbone(m.embed_frames(tokens, mask), positions)[:, -1], tokens


@pytest.mark.parametrize("text, speaker", CASES)
def test_codebook0_logits_match_transformers(gen, hf, text, speaker):
    m = gen._backend.model
    h, tokens = _our_prompt_hidden(gen, text, speaker)
    with torch.no_grad():
        ours = m.codebook0_head(h)[0]
        out = hf(input_ids=tokens[..., -1])  # 2-D text ids: the backbone's codebook-0 logits
    theirs = out.logits[0, -1]
    assert out.logits.shape == (1, tokens.shape[1], 2051)
    assert_close_rel(ours, theirs)
    assert ours.argmax() == theirs.argmax()


@pytest.mark.parametrize("text, speaker", CASES)
def test_decoder_logits_match_transformers_depth_decoder(gen, hf, text, speaker):
    m = gen._backend.model
    h, tokens = _our_prompt_hidden(gen, text, speaker)
    with torch.no_grad():
        hf_h = hf.backbone_model(inputs_embeds=hf.embed_text_tokens(tokens[..., -1])).last_hidden_state[:, -1]
    assert_close_rel(h, hf_h)
    for c0 in (int(m.codebook0_head(h).argmax()), 7, 2050):
        code = torch.tensor([c0])
        with torch.no_grad():
            x = torch.stack([h, m.embed_audio(0, code)], dim=1)
            state = m.decoder(m.projection(x), torch.arange(2))[:, -1]
            ours = m.codebook_logits(1, state)[0]
            # position 0 is a placeholder replaced by the backbone state; logits skip it
            out = hf.depth_decoder(input_ids=torch.tensor([[0, c0]]), backbone_last_hidden_state=h)
        assert out.logits.shape == (1, 1, 2051)
        assert_close_rel(ours, out.logits[0, -1])


# --- (c) every layout -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, speaker", CASES[:1])
def test_official_and_csm_layouts_give_identical_codes(gen, tiny_official_dir, tiny_csm_dir, text, speaker):
    reference = gen.generate_codes(text, speaker, topk=1, max_audio_length_ms=MAX_MS)
    official, ours = load(tiny_official_dir), load(tiny_csm_dir)
    assert official._backend.model.config == gen.config == ours.config
    np.testing.assert_array_equal(official.generate_codes(text, speaker, topk=1, max_audio_length_ms=MAX_MS), reference)
    np.testing.assert_array_equal(ours.generate_codes(text, speaker, topk=1, max_audio_length_ms=MAX_MS), reference)
    # the weights themselves are identical after loading
    sd, sd_off = gen._backend.model.state_dict(), official._backend.model.state_dict()
    assert all(torch.equal(sd[k], sd_off[k]) for k in sd)


# --- (d) teacher-forced training forward ----------------------------------------------------------

def test_forward_train_matches_step_by_step_generation(gen, monkeypatch):
    recorded = []
    original = frame_loop_module.sample

    def recording_sample(logits, *args):
        recorded.append(logits.detach().clone())
        return original(logits, *args)

    monkeypatch.setattr(frame_loop_module, "sample", recording_sample)
    text, speaker = CASES[0]
    codes = gen.generate_codes(text, speaker, topk=1, max_audio_length_ms=MAX_MS)
    monkeypatch.undo()
    f = len(codes)
    assert f >= 8 and len(recorded) == 32 * f  # the stop frame was not hit: every sample belongs to a kept frame
    step = torch.stack(recorded).view(f, 32, -1)  # [frame, codebook, V], codebook i from sample i

    prompt = gen.prompt(text, speaker)
    p = len(prompt)
    tokens = np.concatenate([prompt.tokens, np.pad(codes, ((0, 0), (0, 1)))])
    mask = np.concatenate([prompt.mask, np.tile(np.arange(33) < 32, (f, 1))])
    tokens, mask = torch.from_numpy(tokens)[None], torch.from_numpy(mask)[None]
    m = gen._backend.model
    with torch.no_grad():
        c0_logits, dec_logits = m.forward_train(tokens, mask, tokens[:, 1:, :32])
    assert c0_logits.shape == (1, p + f, 2051)
    assert dec_logits.shape == (1, p + f - 1, 31, 2051)
    # position p-1+j predicts generated frame j
    assert_close_rel(c0_logits[0, p - 1], step[0, 0])
    for j in range(f):
        assert_close_rel(c0_logits[0, p - 1 + j], step[j, 0])
        for i in range(1, 32):
            assert_close_rel(dec_logits[0, p - 1 + j, i - 1], step[j, i])
    # and the greedy codes are the argmax of the teacher-forced logits
    assert torch.equal(c0_logits[0, p - 1 : p - 1 + f].argmax(-1), torch.from_numpy(codes[:, 0]))
    assert torch.equal(dec_logits[0, p - 1 : p - 1 + f].argmax(-1), torch.from_numpy(codes[:, 1:]))


# --- (e) sampling ---------------------------------------------------------------------------------

def test_seeded_sampling_is_reproducible(gen):
    text, speaker = CASES[1]
    kw = dict(topk=50, temperature=0.9, max_audio_length_ms=MAX_MS)
    a = gen.generate_codes(text, speaker, seed=1234, **kw)
    b = gen.generate_codes(text, speaker, seed=1234, **kw)
    c = gen.generate_codes(text, speaker, seed=4321, **kw)
    assert len(a) >= 1
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)
    greedy = gen.generate_codes(text, speaker, topk=1, max_audio_length_ms=MAX_MS)
    assert a.shape != greedy.shape or not np.array_equal(a, greedy)


def test_topk_1_equals_temperature_0(gen):
    text, speaker = CASES[0]
    a = gen.generate_codes(text, speaker, topk=1, temperature=0.9, seed=5, max_audio_length_ms=MAX_MS)
    b = gen.generate_codes(text, speaker, topk=50, temperature=0.0, seed=6, max_audio_length_ms=MAX_MS)
    np.testing.assert_array_equal(a, b)
    assert len(a) >= 8


# --- streamed code blocks ---------------------------------------------------------------------------

def test_streamed_blocks_concatenate_to_the_generated_codes(gen):
    from csm.streaming import ChunkPlan

    whole = gen.generate_codes(*CASES[0], max_audio_length_ms=MAX_MS, temperature=0.9, topk=50, seed=7)
    engine = csm.Engine(gen, max_batch_size=1, background=False)
    sampling = csm.Sampling(temperature=0.9, topk=50, max_audio_length_ms=MAX_MS, seed=7)
    blocks = list(engine.submit_prompt(gen.prompt(*CASES[0]), sampling, plan=ChunkPlan(2, 3)).blocks())
    assert len(whole) == MAX_FRAMES  # the tiny model does not stop early on this seed
    assert sum(map(len, blocks)) == MAX_FRAMES and len(blocks) > 1
    np.testing.assert_array_equal(np.concatenate(blocks), whole)


# --- batches ---------------------------------------------------------------------------------------

def test_batch_of_prompts_of_different_lengths_gives_each_its_own_greedy_codes(gen):
    texts = ["Hi.", "A much longer sentence, to pad the others in the batch.", "Medium length here."]
    alone = [gen.generate_codes(t, 1, topk=1, max_audio_length_ms=MAX_MS) for t in texts]
    together = gen.generate_codes_batch(texts, speakers=1, topk=1, max_audio_length_ms=MAX_MS)
    assert len({len(gen.prompt(t, 1).tokens) for t in texts}) == 3
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_batch_gives_each_turn_its_solo_sampled_codes(gen):
    texts = ["Hi.", "A much longer sentence, to pad the others in the batch."]
    kw = dict(temperature=0.9, topk=50, top_p=0.8, max_audio_length_ms=MAX_MS)
    together = gen.generate_codes_batch(texts, speakers=[1, 2], seed=40, **kw)
    for i, (text, speaker) in enumerate(zip(texts, [1, 2], strict=True)):
        np.testing.assert_array_equal(together[i], gen.generate_codes(text, speaker, seed=40 + i, **kw))


def test_batch_api_checks_one_speaker_and_context_per_text(gen):
    with pytest.raises(csm.CsmError, match="one speaker and one context per text"):
        gen.generate_codes_batch(["a", "b"], speakers=[0])


def test_fused_projections_give_the_same_logits(tiny_transformers_dir):
    from csm.checkpoint import open_checkpoint

    ckpt = open_checkpoint(tiny_transformers_dir[0])
    cpu = torch.device("cpu")
    plain = loading.load_model(ckpt.config, loading.checkpoint_tensors(ckpt, cpu, torch.float32), cpu, torch.float32)
    fused = loading.fuse_for_inference(
        loading.load_model(ckpt.config, loading.checkpoint_tensors(ckpt, cpu, torch.float32), cpu, torch.float32))
    assert not hasattr(fused.backbone.layers[0].self_attn, "q_proj")
    x = torch.randn(2, 5, plain.config.backbone.hidden_size)
    pos = torch.arange(5)
    assert_close_rel(fused.backbone(x, pos), plain.backbone(x, pos), rel=1e-6)


def test_compile_modes_are_named_or_refused():
    assert frame_loop_module.compile_options(False) is None
    assert frame_loop_module.compile_options(True) == {}
    assert frame_loop_module.compile_options("max-autotune")["max_autotune"] is True
    with pytest.raises(csm.CsmError, match="unknown compile mode"):
        frame_loop_module.compile_options("fastest")
