"""Synthetic English speech for the demo model: sentences, espeak-ng voices, augmentation.

Sentences (1-12 words) come from a small grammar for home automation and dictation ("turn on the kitchen
lights", "set a timer for twenty minutes", "send a message to anna saying i'm on my way"), spoken numbers
(digit strings, zero to ninety-nine as words) and a little word salad over the same vocabulary. Transcripts
hold lower-case letters, apostrophes and single spaces only.

Every sentence belongs to one split by a hash of its text (``test`` 1/20, ``dev`` 1/20, ``train`` the
rest), so a held-out sentence never appears in training, whatever seeds or sizes are used.

Audio: espeak-ng (voices ``en``, ``en-us``, ``en-gb-x-rp``, ``en-029``, ... with variants ``+m1``...``+m7``,
``+f1``...``+f5`` and others; 120-200 words/min; pitch 20-80; word gaps) through
:func:`streamer.testing.espeak_audio` (22050 Hz resampled to 16 kHz with soxr; ``$STREAMER_ESPEAK`` names
another espeak-ng command), trimmed. Augmentation (:func:`augment`): short leading and trailing silence,
random gain, white, pink or brown noise at 10-30 dB SNR. Everything is deterministic given the seed:
utterance ``i`` of a split draws from ``numpy.random.default_rng([seed, split, i])`` whatever the number of
worker processes.

Outputs:

* a training set: ``DIR/audio.npy`` (clean int16 16 kHz samples, all utterances concatenated) and
  ``DIR/index.jsonl`` (text, voice, offset, length per utterance); the trainer augments on the fly.
* ``--manifest``: ``DIR/wav/NNNNN.wav`` (augmented unless ``--no-augment``) and ``DIR/manifest.jsonl`` with
  ``{"audio": "wav/NNNNN.wav", "text": ...}`` lines (paths relative to the manifest), for ``streamer eval``.

Examples, from the repository root::

    python -m recipes.demo.data --split train -n 20000 --out data/train
    python -m recipes.demo.data --split test -n 500 --manifest --out data/test
    python -m recipes.demo.data --words        # the vocabulary, one word per line
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import wave
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from streamer.testing import espeak_audio, espeak_command

__all__ = [
    "SAMPLE_RATE",
    "SPLITS",
    "Utterance",
    "Voice",
    "augment",
    "generate",
    "load_dataset",
    "make_sentence",
    "manifest_audio",
    "number_words",
    "sample_voice",
    "sentence_split",
    "synthesize",
    "synthesize_pcm",
    "vocabulary",
    "write_manifest",
]

SAMPLE_RATE = 16000
SPLITS = {"train": 0, "dev": 1, "test": 2}
MAX_WORDS = 12

# ---------------------------------------------------------------------------------------------------------
# Sentences
# ---------------------------------------------------------------------------------------------------------

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen").split()
TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """0-99 as words: ``42`` -> ``"forty two"`` (no hyphens)."""
    if not 0 <= n <= 99:
        raise ValueError(f"number out of range: {n}")
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens - 2] + ("" if ones == 0 else " " + ONES[ones])


# Slot grammar: "{name}" expands to a random choice of SLOTS[name] (choices may hold slots themselves).
# Homophones make a spelled transcript ambiguous: the vocabulary keeps only one of each pair ("hour", not
# "our"; "no", not "know"), except to/two and for/four, which the grammar puts in distinct contexts.
SLOTS: dict[str, list[str]] = {
    "onoff": ["on", "off"],
    "room": ["kitchen", "living room", "bedroom", "bathroom", "hallway", "garage", "office", "dining room",
             "basement", "garden", "porch", "attic", "nursery", "study", "laundry room", "guest room",
             "kids room", "master bedroom", "front yard", "back yard"],
    "light": ["lights", "light", "lamp", "ceiling light", "floor lamp", "desk lamp", "lamps", "spotlights",
              "reading light", "night light"],
    "appliance": ["fan", "heater", "tv", "television", "radio", "air conditioner", "coffee maker", "kettle",
                  "oven", "dishwasher", "washing machine", "dryer", "vacuum", "sprinkler", "humidifier",
                  "air purifier", "fireplace", "speaker", "music", "computer", "printer"],
    "opening": ["garage door", "blinds", "curtains", "window", "windows", "shades", "front gate",
                "skylight"],
    "openclose": ["open", "close", "shut"],
    "door": ["front door", "back door", "garage door", "side door", "gate"],
    "lockunlock": ["lock", "unlock"],
    "color": ["red", "blue", "green", "white", "warm white", "cool white", "yellow", "purple", "orange",
              "pink"],
    "brighter": ["brighter", "dimmer", "warmer", "cooler"],
    "warmer": ["warmer", "cooler", "colder", "hotter"],
    "raise": ["raise", "lower", "increase", "decrease"],
    "updown": ["up", "down"],
    "pct": ["{n99}", "{tens}", "{tens}", "one hundred"],
    "tens": TENS + ["ten"],
    "n99": ["{num}"],
    "small": ONES[1:13],
    "duration": ["{small} minutes", "{num} minutes", "{num} seconds", "{small} hours", "one minute",
                 "one hour", "an hour", "half an hour", "a minute", "{small} hours and {num} minutes",
                 "{num} minutes and {num} seconds"],
    "hour": ONES[1:13],
    "clock": ["{hour} o'clock", "{hour} {minute}", "{hour} thirty", "{hour} fifteen", "{hour} forty five",
              "half past {hour}", "quarter past {hour}", "quarter to {hour}", "noon", "midnight",
              "{hour} in the morning", "{hour} in the evening", "{hour} at night", "{hour} {minute} pm",
              "{hour} {minute} am"],
    "minute": ["{minnum}"],
    "day": ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"],
    "when": ["in {duration}", "tomorrow", "tonight", "this evening", "tomorrow morning", "at {clock}",
             "on {day}", "next week", "later today", "this afternoon", "on {day} at {clock}",
             "tomorrow at {clock}"],
    "whenw": ["today", "tomorrow", "tonight", "this weekend", "on {day}", "this afternoon", "next week",
              "this morning", "right now"],
    "task": ["call {name}", "take out the trash", "water the plants", "pick up the kids", "pay the bills",
             "feed the cat", "walk the dog", "take my medicine", "check the oven", "charge my phone",
             "book a doctor's appointment", "send the report", "clean the kitchen", "lock the back door",
             "order more {item}", "pick up some {item}", "move the car", "bring an umbrella",
             "reply to {name}", "start the dishwasher", "close the windows"],
    "item": ["milk", "bread", "eggs", "butter", "cheese", "coffee", "tea", "apples", "bananas", "rice",
             "pasta", "sugar", "flour", "orange juice", "tomatoes", "potatoes", "onions", "chicken", "fish",
             "yogurt", "cereal", "soap", "toilet paper", "batteries", "dog food", "cat food", "water",
             "lemons", "carrots", "salt"],
    "name": ["john", "mary", "david", "sarah", "emma", "james", "anna", "peter", "lucy", "tom", "kate",
             "michael", "laura", "paul", "alice", "mark", "daniel", "olivia", "mom", "dad", "grandma",
             "grandpa", "jack", "sophie", "ben"],
    "media": ["some music", "jazz", "classical music", "the news", "the radio", "my playlist",
              "relaxing music", "rock music", "the podcast", "something happy", "my favorite songs",
              "the morning news", "rain sounds", "white noise"],
    "machine": ["dishwasher", "washing machine", "dryer", "vacuum", "coffee maker", "robot vacuum",
                "sprinkler", "kettle", "oven"],
    "startstop": ["start", "stop", "pause", "resume"],
    "scene": ["movie", "night", "away", "reading", "party", "dinner", "morning", "relax", "guest"],
    "please": ["", "", "", "please", "can you", "could you", "hey computer", "okay computer"],
    "msg": ["i'll be home in {duration}", "i'm running a little late", "i'm on my way",
            "can you pick up some {item} on the way home", "don't forget the meeting {whenw}",
            "thanks for dinner last night", "see you at {clock}", "the meeting has been moved to {day}",
            "please call me back when you can", "let's have lunch on {day}", "we need more {item}",
            "it's raining so take an umbrella", "happy birthday have a great day",
            "i left my keys in the {room}", "the {appliance} is broken again", "dinner is ready",
            "what time does the train leave", "i can't make it {whenw}", "we're out of {item}",
            "could you feed the cat please", "the kids are asleep", "i'm at the station",
            "the package arrived {whenw}", "call me when you get this", "i love you",
            "the doctor's appointment is at {clock}", "don't wait for me", "let's meet at {clock}",
            "i'll send the report {whenw}", "good luck with the interview", "that sounds great",
            "no problem", "i'm sorry i missed your call", "the plumber is coming on {day}",
            "it was nice to see you", "what's the address", "i'll be there in {duration}",
            "the train is delayed by {duration}", "we have no {item} left"],
    "digit": ONES[:10],
    "command": ["stop", "pause", "resume", "cancel", "yes", "no", "help", "repeat that", "never mind",
                "louder", "quieter", "next", "previous", "go back", "thank you", "good morning",
                "good night", "good evening", "okay", "mute", "unmute", "shuffle"],
}

HOME = [
    "{please} turn {onoff} the {room} {light}", "{please} turn the {room} {light} {onoff}",
    "turn {onoff} the {appliance}", "turn {onoff} the {appliance} in the {room}",
    "switch {onoff} the {light} in the {room}", "switch the {appliance} {onoff}",
    "dim the {room} {light} to {pct} percent", "set the {room} {light} to {pct} percent",
    "set the {light} to {color}", "change the {room} {light} to {color}", "make the {light} {brighter}",
    "set the brightness to {pct} percent", "{please} set the thermostat to {n99} degrees",
    "set the temperature in the {room} to {n99} degrees", "make it {warmer} in the {room}",
    "{raise} the temperature by {small} degrees", "what's the temperature in the {room}",
    "what's the temperature outside", "{please} set a timer for {duration}", "set a {n99} minute timer",
    "start a timer for {duration}", "how much time is left on the timer", "cancel the timer",
    "set an alarm for {clock}", "wake me up at {clock}", "wake me up at {clock} on {day}",
    "set an alarm for {clock} tomorrow", "snooze the alarm for {duration}", "turn off the alarm",
    "remind me to {task} {when}", "remind me {when} to {task}", "{please} {openclose} the {opening}",
    "{openclose} the {opening} in the {room}", "{lockunlock} the {door}", "is the {door} locked",
    "are the lights on in the {room}", "play {media} in the {room}", "play {media}",
    "turn the volume {updown}", "turn the volume {updown} in the {room}", "set the volume to {n99}",
    "set the volume to {small} percent", "pause the music", "skip this song", "play the next song",
    "stop the music in the {room}", "what's the weather {whenw}", "will it rain {whenw}",
    "what time is it", "{startstop} the {machine}", "{please} add {item} to the shopping list",
    "add {item} and {item} to the shopping list", "what's on my shopping list",
    "remove {item} from the shopping list", "{please} call {name}", "activate {scene} mode",
    "turn on {scene} mode", "i'm leaving", "i'm home", "good night turn off all the lights",
    "turn off all the lights", "turn on all the lights in the {room}", "is the {appliance} on",
    "how long until the {machine} is done", "set the fan to high", "set the fan to low",
    "turn the heating {updown} to {n99} degrees", "close all the {opening}",
    "what's the humidity in the {room}", "is anyone in the {room}", "show the camera in the {room}",
]

DICTATION = [
    "send a message to {name} saying {msg}", "text {name} {msg}", "reply {msg}", "take a note {msg}",
    "{msg}", "{msg}", "{msg}", "new paragraph", "new line", "full stop", "comma", "question mark",
    "start a new email to {name}", "schedule a meeting with {name} on {day} at {clock}",
    "what's on my calendar {whenw}", "read my messages", "read the last message from {name}",
    "i'll call you back {when}", "tell {name} {msg}", "send an email to {name}", "delete that",
    "undo that", "the subject is {msg}", "add a meeting with {name} {when}",
]

NUMBERS = [
    "{digits}", "{digits}", "{n99}", "{n99} {n99}", "my number is {digits}", "the code is {digits}",
    "page {n99}", "room {n99}", "call {digits}", "channel {n99}", "the answer is {n99}",
    "{n99} {n99} {n99}", "count to {small}",
]

SINGLE = ["{command}"]

CATEGORIES: list[tuple[float, list[str]]] = [(0.48, HOME), (0.26, DICTATION), (0.14, NUMBERS),
                                             (0.08, ["<salad>"]), (0.04, SINGLE)]
# Homophones that only context tells apart: left out of the word salad.
SALAD_EXCLUDE = {"to", "two", "for", "four"}


def _expand(template: str, rng: np.random.Generator) -> str:
    out = []
    i = 0
    while i < len(template):
        j = template.find("{", i)
        if j < 0:
            out.append(template[i:])
            break
        k = template.index("}", j)
        out.append(template[i:j])
        out.append(_slot(template[j + 1:k], rng))
        i = k + 1
    return "".join(out)


def _slot(name: str, rng: np.random.Generator) -> str:
    if name == "num":
        return number_words(int(rng.integers(0, 100)))
    if name == "minnum":
        return number_words(int(rng.integers(10, 60)))
    if name == "digits":
        n = int(rng.choice([1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10, 11, 12]))
        return " ".join(ONES[int(d)] for d in rng.integers(0, 10, size=n))
    choices = SLOTS[name]
    return _expand(choices[int(rng.integers(len(choices)))], rng)


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _raw_sentence(rng: np.random.Generator) -> str:
    weights = np.array([w for w, _ in CATEGORIES])
    cat = CATEGORIES[int(rng.choice(len(CATEGORIES), p=weights / weights.sum()))][1]
    template = cat[int(rng.integers(len(cat)))]
    if template == "<salad>":
        words = [w for w in vocabulary() if w not in SALAD_EXCLUDE]
        n = int(rng.integers(1, MAX_WORDS + 1))
        return " ".join(words[int(i)] for i in rng.integers(0, len(words), size=n))
    return _normalise(_expand(template, rng))


def sentence_split(text: str) -> str:
    """The split that owns a sentence: a stable hash puts 1/20 in ``test``, 1/20 in ``dev``."""
    bucket = int.from_bytes(hashlib.md5(text.encode()).digest()[:4], "little") % 20
    return "test" if bucket == 0 else "dev" if bucket == 1 else "train"


def make_sentence(rng: np.random.Generator, split: str = "train") -> str:
    """A random sentence of 1-12 words belonging to ``split``."""
    while True:
        text = _raw_sentence(rng)
        if 1 <= len(text.split()) <= MAX_WORDS and sentence_split(text) == split:
            return text


_VOCAB: list[str] | None = None


def _slot_words(name: str, seen: frozenset[str]) -> set[str]:
    if name in ("num", "minnum", "digits"):
        return set(ONES) | set(TENS)
    if name in seen:
        return set()
    words: set[str] = set()
    for choice in SLOTS[name]:
        words |= _template_words(choice, seen | {name})
    return words


def _template_words(template: str, seen: frozenset[str] = frozenset()) -> set[str]:
    words: set[str] = set()
    rest = template
    while "{" in rest:
        j = rest.index("{")
        k = rest.index("}", j)
        words |= set(rest[:j].split())
        words |= _slot_words(rest[j + 1:k], seen)
        rest = rest[k + 1:]
    return words | set(rest.split())


def vocabulary() -> list[str]:
    """Every word the grammar can produce, sorted (shipped as ``words.txt`` next to the model)."""
    global _VOCAB
    if _VOCAB is None:
        words: set[str] = set(ONES) | set(TENS)
        for _, templates in CATEGORIES:
            for t in templates:
                if t != "<salad>":
                    words |= _template_words(t)
        _VOCAB = sorted(words)
    return list(_VOCAB)


# ---------------------------------------------------------------------------------------------------------
# Voices and synthesis
# ---------------------------------------------------------------------------------------------------------

VOICES = ["en", "en-us", "en-gb-x-rp", "en-029", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
          "en-us-nyc"]
VARIANTS = ([""] + [f"m{i}" for i in range(1, 8)] + [f"f{i}" for i in range(1, 6)]
            + ["Alex", "Andy", "Annie", "Alicia", "Andrea", "adam", "aunty", "belinda", "benjamin", "david",
               "ed", "edward", "john", "linda", "max", "Michael", "Mike", "paul", "quincy", "robert", "steph",
               "zac", "klatt", "klatt2", "klatt3"])
SPEED_RANGE = (120, 200)  # words per minute
PITCH_RANGE = (20, 80)


@dataclass(frozen=True)
class Voice:
    voice: str
    variant: str
    speed: int
    pitch: int
    gap: int  # extra pause between words, in units of 10 ms at normal speed

    @property
    def name(self) -> str:
        return self.voice + (f"+{self.variant}" if self.variant else "")


def sample_voice(rng: np.random.Generator) -> Voice:
    """A voice drawn uniformly over voices, variants, speeds and pitches."""
    gap = 0 if rng.random() < 0.7 else int(rng.integers(1, 5))
    return Voice(
        voice=VOICES[int(rng.integers(len(VOICES)))],
        variant=VARIANTS[int(rng.integers(len(VARIANTS)))],
        speed=int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1)),
        pitch=int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)),
        gap=gap,
    )


def trim(audio: np.ndarray, margin: int = 160, threshold: float = 0.01) -> np.ndarray:
    """Cut leading and trailing silence, keeping ``margin`` samples around the speech."""
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    if peak == 0.0:
        return audio
    loud = np.flatnonzero(np.abs(audio) > threshold * peak)
    return audio[max(0, loud[0] - margin): loud[-1] + margin + 1]


def synthesize(text: str, voice: Voice, command: Sequence[str] | None = None) -> np.ndarray:
    """Speak ``text`` with espeak-ng in ``voice``: trimmed float32 mono at 16 kHz."""
    return trim(espeak_audio(text, voice=voice.name, speed=voice.speed, pitch=voice.pitch, gap=voice.gap,
                             command=command))


# ---------------------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------------------

def _noise(n: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    white = rng.standard_normal(n).astype(np.float32)
    if kind == "white" or n < 4:
        return white
    spec = np.fft.rfft(white)
    f = np.arange(spec.size, dtype=np.float32)
    f[0] = 1.0
    spec /= np.sqrt(f) if kind == "pink" else f
    out = np.fft.irfft(spec, n).astype(np.float32)
    return np.asarray(out / (out.std() + 1e-8), dtype=np.float32)


def augment(audio: np.ndarray, rng: np.random.Generator, *, silence: tuple[float, float] = (0.0, 0.5),
            snr_db: tuple[float, float] = (10.0, 30.0), clean_prob: float = 0.1,
            peak: tuple[float, float] = (0.05, 0.9)) -> np.ndarray:
    """Leading/trailing silence, a random peak level (gain) and coloured noise at a random SNR."""
    lead = int(rng.uniform(*silence) * SAMPLE_RATE)
    tail = int(rng.uniform(*silence) * SAMPLE_RATE)
    level = rng.uniform(*peak)
    kind = ("white", "pink", "brown")[int(rng.integers(3))]
    snr = rng.uniform(*snr_db)
    clean = rng.random() < clean_prob
    x = audio.astype(np.float32)
    x = x * np.float32(level / (float(np.abs(x).max()) + 1e-8))
    power = float(np.mean(x ** 2)) + 1e-12
    x = np.concatenate([np.zeros(lead, np.float32), x, np.zeros(tail, np.float32)])
    if not clean:
        x = (x + _noise(x.size, kind, rng) * np.float32(np.sqrt(power / 10 ** (snr / 10)))).astype(np.float32)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Utterance:
    index: int
    text: str
    voice: str
    speed: int
    pitch: int
    gap: int
    offset: int = 0
    length: int = 0


def utterance_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index])


def plan(split: str, n: int, seed: int, unique: bool = False) -> list[tuple[Utterance, Voice]]:
    """The sentences and voices of utterances ``0..n-1`` (cheap: no audio)."""
    out: list[tuple[Utterance, Voice]] = []
    seen: set[str] = set()
    i = 0
    while len(out) < n:
        rng = utterance_rng(seed, split, i)
        text = make_sentence(rng, split)
        voice = sample_voice(rng)
        i += 1
        if unique:
            if text in seen:
                continue
            seen.add(text)
        out.append((Utterance(len(out), text, voice.name, voice.speed, voice.pitch, voice.gap), voice))
    return out


def synthesize_pcm(text: str, voice: Voice, command: Sequence[str] | None = None) -> np.ndarray:
    """:func:`synthesize` as the clean int16 samples that datasets and manifests start from."""
    return np.asarray(np.clip(synthesize(text, voice, command), -1, 1) * 32767, dtype=np.int16)


def _synth_job(args: tuple[str, Voice, list[str]]) -> np.ndarray:
    return synthesize_pcm(*args)


def manifest_audio(pcm: np.ndarray, split: str, index: int, seed: int = 0, augmented: bool = True) -> np.ndarray:
    """The float samples :func:`write_manifest` writes for utterance ``index`` of ``split``."""
    audio = pcm.astype(np.float32) / 32767
    if augmented:
        audio = augment(audio, np.random.default_rng([seed, SPLITS[split], index, 1]))
    return audio


def _synthesize_all(items: list[tuple[Utterance, Voice]], jobs: int, progress: bool) -> Iterator[np.ndarray]:
    command = espeak_command()
    work = [(u.text, v, command) for u, v in items]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(work), unit="utt", desc="espeak-ng", file=sys.stderr)
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for audio in pool.map(_synth_job, work, chunksize=max(1, min(64, len(work) // (jobs * 8) or 1))):
            if bar is not None:
                bar.update()
            yield audio
    if bar is not None:
        bar.close()


def generate(out: Path, split: str, n: int, seed: int = 0, jobs: int | None = None,
             progress: bool = True) -> list[Utterance]:
    """Write a clean training-format dataset (``audio.npy`` + ``index.jsonl``) to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    items = plan(split, n, seed, unique=split != "train")
    chunks = []
    offset = 0
    for (utt, _), audio in zip(items, _synthesize_all(items, jobs or os.cpu_count() or 1, progress),
                               strict=True):
        utt.offset, utt.length = offset, int(audio.size)
        offset += audio.size
        chunks.append(audio)
    np.save(out / "audio.npy", np.concatenate(chunks) if chunks else np.zeros(0, np.int16))
    with open(out / "index.jsonl", "w") as f:
        for utt, _ in items:
            f.write(json.dumps(asdict(utt)) + "\n")
    (out / "info.json").write_text(json.dumps({"split": split, "n": n, "seed": seed,
                                               "sample_rate": SAMPLE_RATE, "seconds": offset / SAMPLE_RATE}))
    return [u for u, _ in items]


def load_dataset(path: Path) -> tuple[np.ndarray, list[Utterance]]:
    """``(int16 samples, utterances)`` of a dataset written by :func:`generate` (samples memory-mapped)."""
    audio = np.load(path / "audio.npy", mmap_mode="r")
    with open(path / "index.jsonl") as f:
        utts = [Utterance(**json.loads(line)) for line in f if line.strip()]
    return audio, utts


def _write_wav(path: Path, audio: np.ndarray) -> None:
    pcm = np.asarray(np.clip(audio, -1, 1) * 32767, dtype="<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
    path.write_bytes(buf.getvalue())


def write_manifest(out: Path, split: str, n: int, seed: int = 0, jobs: int | None = None,
                   augmented: bool = True, progress: bool = True) -> Path:
    """Write ``n`` distinct sentences of ``split`` as WAV files plus ``manifest.jsonl``; return its path."""
    (out / "wav").mkdir(parents=True, exist_ok=True)
    items = plan(split, n, seed, unique=True)
    manifest = out / "manifest.jsonl"
    with open(manifest, "w") as f:
        for (utt, _), pcm in zip(items, _synthesize_all(items, jobs or os.cpu_count() or 1, progress),
                                 strict=True):
            name = f"wav/{utt.index:05d}.wav"
            _write_wav(out / name, manifest_audio(pcm, split, utt.index, seed, augmented))
            f.write(json.dumps({"audio": name, "text": utt.text, "voice": utt.voice, "speed": utt.speed,
                                "pitch": utt.pitch}) + "\n")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m recipes.demo.data",
        description="Generate espeak-ng speech for the demo model (see the module docstring).",
    )
    p.add_argument("--split", choices=sorted(SPLITS), default="train",
                   help="which sentences: train, dev or held-out test (disjoint by sentence hash)")
    p.add_argument("-n", "--num", type=int, default=1000, help="number of utterances (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", type=Path, help="output directory")
    p.add_argument("--manifest", action="store_true",
                   help="write WAV files and manifest.jsonl (for `streamer eval`) instead of audio.npy")
    p.add_argument("--no-augment", action="store_true", help="manifest: clean audio, no noise or silence")
    p.add_argument("-j", "--jobs", type=int, default=os.cpu_count(), help="parallel espeak-ng processes")
    p.add_argument("--words", action="store_true", help="print the vocabulary, one word per line, and exit")
    p.add_argument("--sentences", action="store_true", help="print the sentences only (no audio) and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.words:
        print("\n".join(vocabulary()))
        return 0
    if a.sentences:
        for utt, voice in plan(a.split, a.num, a.seed, unique=a.split != "train"):
            print(f"{voice.name}\t{voice.speed}\t{voice.pitch}\t{utt.text}")
        return 0
    if a.out is None:
        p.error("--out is required")
    if a.manifest:
        path = write_manifest(a.out, a.split, a.num, a.seed, a.jobs, not a.no_augment, not a.quiet)
        print(path)
    else:
        utts = generate(a.out, a.split, a.num, a.seed, a.jobs, not a.quiet)
        secs = sum(u.length for u in utts) / SAMPLE_RATE
        print(f"{len(utts)} utterances, {secs / 3600:.2f} h of audio in {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
