"""Long videos as overlapping chunks the tokenizer can take: tokenizing, streaming, decoding and
generating them chunk by chunk.

Paper: §3.4 and Appendix F.1 (decoding conditioned on clean frames, long videos). Official release
(apple/ml-videoflextok, its chunk wrapper): chunked tokenization and decoding, the overlap frame
re-encoded as decoded.

A chunk is the longest clip the tokenizer takes, (T'_max - 1) * f + 1 frames for a VAE with
temporal factor f (17 for the tiny preset on pixels and for d18 on VidTok); chunks overlap by one
frame, so a video must have 1 + 16n frames (1 + stride * n in general). When generating, the AR
model's latent frames per sequence (at most T'_max) set the chunk instead: 5 for the AR presets
trained on 17-frame clips, so again 17 frames through VidTok.
- Tokenizing (`tokenize_long`): 17-frame windows with stride 16. Every chunk after the first drops
  its first latent frame: it encodes the overlap frame alone, which the previous chunk already
  covered. So 81 frames with a 4x VAE are 1 + 4 * 5 = 21 latent frames, 672 tokens at 32 tokens per
  frame.
- Decoding (`decode_long`) runs chunk by chunk. Chunk 1 is decoded from its tokens. For each later
  chunk the last *decoded* frame is re-encoded (VAE, then the tokenizer's encoder) and put in front
  of the chunk's new latent frames; its clean latent is the prefix that `decode` holds fixed (the
  decoder masks that frame's registers), and the re-decoded overlap frame is removed from the
  output. Content stays consistent across chunks even from a single token per frame, because each
  chunk continues from pixels rather than from tokens.
- Generating (`generate_ids`): the AR model was trained on sequences of T'_max latent frames, and in
  time-first order a frame's tokens are spread over the whole sequence, so it cannot be asked to
  continue a previous chunk's tokens. Each chunk's tokens are therefore sampled independently from
  the same condition, and their first frame is dropped (its place is the re-encoded overlap frame).
  Continuity comes only from the decoder's frame conditioning: motion and content that the AR model
  chooses differently in the next chunk change at the chunk boundary, guided by the same prompt.
  That is the limit of this design; an AR model trained on longer sequences or with frame prefixes
  would remove it.

Beyond batch use (both rest on time causality, frame t never depending on later frames):
- Streaming tokenization (`tokenize_stream`): frames in as they arrive, each latent frame's ids out
  as soon as the causal VAE has produced it, identical to `tokenize_long`.
- Progressive decoding (`decode_pieces` with progressive=True): frame by frame, each piece yielded
  the moment it is decoded, the same video as joint decoding.
"""
import itertools
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ar import from_sequence
from vae import checked_frame_stream


@dataclass(frozen=True)
class Chunks:
    latents: int   # latent frames per chunk
    temporal: int  # video frames per latent frame (the VAE's temporal factor)

    @property
    def frames(self):
        return (self.latents - 1) * self.temporal + 1

    @property
    def stride(self):
        return self.frames - 1  # consecutive chunks share one frame

    def check(self, frames):
        """Refuse a frame count the chunking cannot cover exactly; returns the number of chunks."""
        if frames < 1 or (frames - 1) % max(self.stride, 1) or (self.stride == 0 and frames != 1):
            raise ValueError(f"--frames must be 1 + {self.stride}n (chunks of {self.frames} frames overlapping by one, "
                             f"e.g. {self.frames} or {4 * self.stride + 1}); got {frames}")
        return max(1, (frames - 1) // max(self.stride, 1))

    def split(self, video):
        """Video (B, 3, 1 + stride * n, H, W) -> its n chunks (B, 3, frames, H, W), each starting at the last
        frame of the one before."""
        return [video[:, :, i * self.stride:i * self.stride + self.frames] for i in range(self.check(video.shape[2]))]

    def latent_frames(self, frames):
        return (frames - 1) // self.temporal + 1


def tokenize_long(tok, vae, video, chunks):
    """Video (B, 3, 1 + stride * n, H, W) -> ids (B, 1 + (latents - 1) * n, K), chunk by chunk."""
    parts = []
    for i, chunk in enumerate(tqdm(chunks.split(video), desc="tokenizing chunks", leave=False)):
        ids = tok.tokenize(chunk, vae)
        # A later chunk's first latent encodes the overlap frame alone; the previous chunk covered it.
        parts.append(ids if i == 0 else ids[:, 1:])
    return torch.cat(parts, 1)


@torch.no_grad()
def tokenize_stream(tok, vae, frames, chunks):
    """tokenize_long as the video arrives: frames, an iterable of groups (B, 3, n, H, W) of any sizes -> the ids
    (B, 1, K) of each latent frame tokenize_long would give, as soon as the VAE has produced that latent frame
    (vae.encode_stream, then the encoder one frame at a time against its cache, Encoder.encode_frame).

    The chunks are tokenize_long's: a new one starts at the last frame of the previous one, with a fresh VAE
    stream and encoder cache, so a latent frame costs the same however long the stream is; its first latent
    frame, the overlap frame alone, is encoded (the next frames attend to it) but not yielded. The stream may end
    anywhere after a complete latent frame (it need not fill its last chunk); ending inside one is refused once
    everything complete was yielded."""
    tok.check_vae(vae)
    frames = (group[:, :, j:j + 1] for group in checked_frame_stream(frames) for j in range(group.shape[2]))
    head, chunk = next(frames, None), 0   # head: the first frame of the next chunk
    while head is not None:
        last = [head]

        def chunk_frames(head=head):
            yield head
            for frame in itertools.islice(frames, chunks.frames - 1):
                last[0] = frame
                yield frame

        cache = tok.encoder.frame_cache()
        for t, latent in enumerate(vae.encode_stream(chunk_frames())):
            ids = tok.encoder.encode_frame(latent, cache)[1]
            if chunk == 0 or t > 0:
                yield ids
        # The chunk's last frame is the next chunk's first, if the stream goes on.
        following = next(frames, None)
        head = None if following is None else last[0]
        frames = frames if following is None else itertools.chain([following], frames)
        chunk += 1


def decode_long(tok, vae, ids, chunks, **decode_kwargs):
    """Ids (B, L, k) -> video (B, 3, frames, H, W), each chunk conditioned on the last decoded frame."""
    return torch.cat(list(decode_pieces(tok, vae, ids, chunks, **decode_kwargs)), 2)


def decode_pieces(tok, vae, ids, chunks, progressive=False, chunk_budgets=None, **decode_kwargs):
    """decode_long's video, in pieces (B, 3, f, H, W) in frame order: a chunk at a time, or with `progressive`
    the frames of each latent frame as soon as the decoder and the VAE have them (tok.decode_frames, then
    vae.decode_stream; needs the time-causal decoder and no APG). chunk_budgets: tokens per frame of each chunk
    (adaptive budgets), else all of ids' k."""
    k, n = ids.shape[2], chunks.latents - 1
    starts = list(range(chunks.latents, ids.shape[1], n))
    prefix = None
    frame_kwargs = {key: value for key, value in decode_kwargs.items() if key != "apg"}   # decode_frames has no APG
    with flow_progress(tok, (1 + len(starts)) * decode_kwargs.get("steps", 25)):
        for c, start in enumerate(tqdm([0, *starts], desc="decoding chunks", leave=False, disable=not starts)):
            k = k if chunk_budgets is None else int(chunk_budgets[c])
            if prefix is None:
                chunk = ids[:, :chunks.latents, :k]
            else:
                chunk = torch.cat([tok.encode(prefix)[..., :k], ids[:, start:start + n, :k]], 1)
            if progressive:
                pieces = vae.decode_stream(tok.decode_frames(chunk, prefix_latents=prefix, **frame_kwargs),
                                           chunk.shape[1])
            else:
                pieces = [tok.detokenize(chunk, vae, prefix_latents=prefix, **decode_kwargs)]
            skip = 0 if prefix is None else 1   # a later chunk's first frame re-decodes the overlap frame
            for piece in pieces:
                last = piece[:, :, -1:]
                piece, skip = piece[:, :, skip:], max(skip - piece.shape[2], 0)
                if piece.shape[2]:
                    yield piece
            if c < len(starts):
                # The overlap frame is re-encoded as decoded, unclamped (as the official chunk wrapper does; a
                # clamp changes the condition wherever the decoder overshoots [-1, 1]).
                prefix = vae.encode(last, check_range=False)


@contextmanager
def flow_progress(tok, total):
    """A progress bar over Euler steps: every step is one decoder forward pass (CFG halves share one)."""
    bar = tqdm(total=total, desc="flow steps", leave=False)

    def count(*_):  # returns None: a forward hook's return value would replace the output
        bar.update(1)

    hook = tok.decoder.register_forward_hook(count)
    try:
        yield bar
    finally:
        hook.remove()
        bar.close()


def generate_ids(sampler, n_chunks, latents, k, **stream):
    """AR ids (B, 1 + (latents - 1) * n_chunks, k): each chunk sampled independently (see the module
    docstring) by sampler.stream(**stream), its first latent frame dropped after the first chunk."""
    parts = []
    with tqdm(total=n_chunks * latents * k, desc="AR tokens", leave=False) as bar:
        for i in range(n_chunks):
            for seq in sampler.stream(**stream, frames=latents, tokens_per_frame=k):
                bar.update(1)
            ids = from_sequence(seq, latents)
            parts.append(ids if i == 0 else ids[:, 1:])
    return torch.cat(parts, 1)
