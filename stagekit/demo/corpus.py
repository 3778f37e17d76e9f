"""A small built-in text corpus for training the demo tokenizer.

Why built in: the demo checkpoint must be reproducible offline and byte-for-byte, so the BPE is trained on
text that ships with the code instead of anything downloaded. The prose is original, plain English with a
little punctuation, digits, code-ish lines, accented Latin, CJK and emoji, so the learned merges include
multi-byte UTF-8 pieces; that is what makes the incremental detokenizer's hold-back logic testable.
"""

from __future__ import annotations

CORPUS: str = """\
The lighthouse keeper woke before the sun, as she had done for thirty years. She climbed the spiral stairs,
counted the steps out of habit, and wiped the salt from the great glass lens. Below her the harbour was
still asleep. A few fishing boats rocked against the pier, their ropes creaking softly in the grey light.

Every morning she wrote three lines in the logbook: the weather, the state of the sea, and one thing she
had noticed that nobody else would care about. Today it was a gull standing on one leg on the chimney of
the bakery, looking as if it owned the whole town. She smiled, closed the book, and went down for tea.

The town had changed slowly. The old market became a library, the library became a school, and the school
became a place where people came to learn how to build small machines that talk to each other over long
wires. Nobody could quite explain what the machines did, but they hummed politely and never complained.

A model of language is, in the end, a very patient machine. It reads a sentence one piece at a time and
guesses what comes next. It does not know the sea or the gulls or the smell of bread in the morning. It
only knows that after the word "good" the word "morning" often follows, and that a question usually ends
with a question mark. Still, when many such guesses are stacked together, the result can feel like
understanding, the way a thousand small waves can feel like the tide.

To serve such a model to many people at once, engineers split it into stages. The first stage turns words
into numbers, the middle stages pass the numbers through layer after layer, and the last stage turns the
numbers back into a guess about the next word. Each stage can live on a different computer, and the
computers pass their work along like buckets in a line of people fighting a fire.

The hard part is not the arithmetic. The hard part is waiting. If one stage is slow, every stage after it
waits too. So the engineers keep many requests in flight, measure everything, and argue happily about
queues, batches, caches and the price of moving a few megabytes across a network.

Here is a small recipe for bread. Mix 500 grams of flour, 350 grams of warm water, 10 grams of salt and
7 grams of yeast. Knead for ten minutes, rest for one hour, shape the loaf, rest for another 45 minutes,
and bake at 230 degrees for 35 minutes. Let it cool before cutting, which is the hardest step of all.

def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i * 2))

In the evening the keeper lit the lamp and watched the beam sweep across the water: one, two, three,
pause; one, two, three, pause. Ships far away would see it and know where the rocks were. She thought
that this was the best kind of message, simple and honest, repeated until it was no longer needed.

Some visitors came from far away. A café owner from the south brought coffee and told stories about his
naïve younger brother who once tried to sail to the island in a bathtub. A student from Zürich measured
the tides with a notebook and a ruler and said the numbers were beautiful. A traveller from Kraków drew
the lighthouse on a postcard, and a poet from São Paulo wrote a line about the light that nobody could
translate but everybody liked. Crème brûlée, jalapeño, façade, déjà vu, smörgåsbord and piñata were the
words the children learned that summer, and they used them everywhere, correctly or not.

你好，世界。今天天气很好，我们去海边散步吧。灯塔在晚上很亮，船长们都能看见。
こんにちは、世界。灯台の光はとても明るいです。
안녕하세요. 바다가 아름답습니다.
Привет, мир! Маяк светит всю ночь.
Γειά σου κόσμε. Η θάλασσα είναι ήρεμη.

The children drew pictures with emoji on the harbour wall: 🙂 😀 🌊 🚢 🐟 ⚓ 🌞 🌙 ⭐ 🍞 ☕ ❤️ and a very
large 🐙 that the fishermen pretended to be afraid of. The keeper said the octopus was the best drawing
and gave the artist a biscuit, which settled the matter.

Questions people asked the keeper, and her answers:
Q: Is it lonely up there? A: Not with the radio on.
Q: What happens if the lamp breaks? A: I fix it, and if I cannot fix it, I ring the bell.
Q: How many steps are there? A: One hundred and twelve, unless you are tired, then it is more.
Q: Do you ever get bored? A: The sea never does the same thing twice, so neither do I.

Numbers from the logbook: 1999, 2004, 2011, 2017, 2023. Wind 12 knots, waves 1.5 m, visibility 8 km.
Temperature 14.5 C at dawn, 19 C at noon. Boats out: 7. Boats back: 7. That is the only number that
matters, she wrote, and underlined it twice.

When she finally retired, the town gave her a small party in the library that used to be the market.
Someone made a speech, someone else played the accordion badly, and the children sang a song about the
octopus. She thanked everyone, went home, and the next morning woke before the sun, out of habit, and
looked out of the window to check that the light was still turning. It was. She made tea.
"""
