"""Spoken digits, made offline: espeak-ng says "zero" ... "nine" with varied voices, speeds and pitches into an
audio_folder tree <out>/{train,test}/<digit>/*.wav (test speakers are voices the training set never heard).

    python bench/spoken_digits.py data/spoken_digits --per-digit 100
    nnctl train data=spoken_digits model=audio_cnn trainer.max_epochs=15       # classify the words
    nnctl train experiment=spoken_digits_ddpm                                  # generate them (README: Audio)

The tree is generated data: keep it out of version control (data/ is ignored).
"""
from __future__ import annotations

import argparse
import random
import subprocess
from pathlib import Path

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TRAIN_VOICES = ["en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan"]
TEST_VOICES = ["en-gb-x-gbcwmd", "en-us-nyc"]
VARIANTS = ["m1", "m2", "m3", "m4", "f1", "f2", "f3", "f4", "croak", "klatt"]


def speak(text: str, voice: str, speed: int, pitch: int, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), text],
                   check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the audio_folder root to write")
    parser.add_argument("--per-digit", type=int, default=60, help="training clips per digit")
    parser.add_argument("--test-per-digit", type=int, default=20, help="test clips per digit (unseen voices)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    for split, voices, count in (("train", TRAIN_VOICES, args.per_digit), ("test", TEST_VOICES, args.test_per_digit)):
        for digit, word in enumerate(DIGITS):
            for i in range(count):
                voice = f"{rng.choice(voices)}+{rng.choice(VARIANTS)}"
                speak(word, voice, rng.randint(120, 220), rng.randint(20, 80),
                      args.out / split / str(digit) / f"{i:04d}.wav")
        print(f"{split}: {10 * count} clips in {args.out / split}")


if __name__ == "__main__":
    main()
