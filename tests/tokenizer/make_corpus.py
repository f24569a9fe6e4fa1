#!/usr/bin/env python3
# Writes corpus.jsonl, the texts of the tokenizer parity test: {"name": ..., "text": ...} per line.
# Run it again after editing; the file is committed so that the test does not depend on Python.
# Leave out U+0085, U+FEFF and characters assigned after Unicode 14: the JavaScript reference's
# regexes treat them differently from Oniguruma, which Hugging Face tokenizers (and dilu) follow.
import json
import os

cases = []


def add(name, text):
    cases.append({"name": name, "text": text})


# Prose in many scripts.
add("english", "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see, won't we? I'd say they've gone.")
add("english_caps", "HELLO World!! ThIs Is MiXeD CaSe -- and \"quotes\", 'single quotes', (parentheses) [brackets] {braces}.")
add("english_paragraphs", "First paragraph.\n\nSecond paragraph, after a blank line.\n\n\nThird, after two.\n")
add("chinese", "深度求索（DeepSeek）是一家专注于人工智能基础技术研究的公司。我们的目标是探索通用人工智能的本质。")
add("chinese_punct", "你好，世界！这是一个测试：“引号”、《书名号》……还有——破折号。")
add("japanese", "東京は日本の首都です。ひらがな、カタカナ、漢字が混ざっています。ｶﾀｶﾅ（半角）も。")
add("korean", "안녕하세요. 저는 한국어를 공부하고 있습니다. 한글은 세종대왕이 만들었습니다.")
add("arabic", "مرحبا بالعالم. هذه جملة باللغة العربية، مع علامات التشكيل: مَرْحَبًا بِكُمْ.")
add("hebrew", "שלום עולם. זהו משפט בעברית עם ניקוד: שָׁלוֹם.")
add("russian", "Съешь же ещё этих мягких французских булок, да выпей чаю.")
add("greek", "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Αλφάβητο: αβγδεζηθικλμνξοπρστυφχψω.")
add("thai", "สวัสดีครับ ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ")
add("devanagari", "हिन्दी भाषा में संयुक्ताक्षर जैसे क्षत्रिय, ज्ञान, श्री और अनुस्वार ं, चन्द्रबिन्दु ँ, नुक्ता ज़ होते हैं।")
add("devanagari_sanskrit", "ॐ भूर्भुवः स्वः तत्सवितुर्वरेण्यं भर्गो देवस्य धीमहि धियो यो नः प्रचोदयात्॥")
add("tamil", "தமிழ் ஒரு தொன்மையான மொழி.")
add("vietnamese", "Tiếng Việt có nhiều dấu: ă â đ ê ô ơ ư, và thanh điệu: à á ả ã ạ.")
add("combining_decomposed", "e\u0301 a\u0308 n\u0303 o\u0302\u0323 Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f\u031e\u0320\u034dA\u0334\u0335\u031c\u0330\u0354L\u0368\u0367\u0369\u0358\u0320G\u0311\u0357\u030e\u0305\u035b\u0341\u0334\u033b\u0348\u034d\u0354\u0339O\u0342\u030c\u030c\u0358\u0328\u0335\u0339\u033b\u031d\u0333")
add("mixed_scripts", "Hello世界مرحباПриветこんにちは안녕γειαשלום123abc")
add("mixed_tokyo", "Tokyo東京とうきょうトウキョウTOKYO　全角スペース")
add("latin_extended", "Ærøskøbing, Straße, Łódź, Dvořák, Ğüşöç, ĳ, ﬁ ligature, ǅ titlecase")

# Code.
add("python", "def fib(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\nprint(fib(10))  # 55\n")
add("cpp", "#include <vector>\n\ntemplate <class T>\nT sum(const std::vector<T>& v) {\n\tT s{};\n\tfor (const auto& x : v) s += x;\n\treturn s;\n}\n")
add("javascript", "const add = (a, b) => a + b;\nexport default async function main() {\n  await fetch(`https://example.com/api?q=${encodeURIComponent('x y')}`);\n}\n")
add("rust", "fn main() {\n    let v: Vec<u32> = (1..=10).map(|x| x * x).collect();\n    println!(\"{:?}\", v);\n}\n")
add("go", "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tch := make(chan int, 3)\n\tgo func() { ch <- 42 }()\n\tfmt.Println(<-ch)\n}\n")
add("sql", "SELECT u.id, COUNT(*) AS n\nFROM users u\nJOIN orders o ON o.user_id = u.id\nWHERE o.created_at >= '2024-01-01'\nGROUP BY u.id\nHAVING n > 5;\n")
add("html", "<!DOCTYPE html>\n<html lang=\"en\">\n  <body>\n    <p class=\"x\">&lt;tag&gt; &amp; &#x1F600;</p>\n  </body>\n</html>\n")
add("json", "{\"key\": [1, 2.5, -3e10, true, null], \"nested\": {\"a\": \"b\\n\"}}")
add("shell", "#!/bin/bash\nset -euo pipefail\nfor f in *.txt; do\n  wc -l \"$f\" | awk '{print $1}' >> out.log 2>&1\ndone\n")
add("crlf_code", "line one\r\nline two\r\n\r\n\tindented\r\n")
add("latex", "\\begin{equation} E = mc^2, \\quad \\int_0^\\infty e^{-x^2}\\,dx = \\frac{\\sqrt{\\pi}}{2} \\end{equation}")
add("regexy", "^(?:[a-z0-9!#$%&'*+/=?^_`{|}~-]+)@example\\.com$ \\d+\\s*\\w+")
add("punct_runs", "!!!??? ... --- *** ### @@@ ~~~ ``` ''' \"\"\" ;;; ::: ,,, ... !? ?! <<< >>> === !== |||")

# Numbers: every length 1..20, and with separators.
digits = "12345678901234567890"
for n in range(1, 21):
    add(f"digits_{n}", digits[:n])
add("digits_in_text", "In 2024, 1 in 3 people earned $45,000.50 or more; pi = 3.14159265358979; e = 2.71828.")
add("numbers_separators", "1,234,567 1.234.567 1 234 567 1_000_000 1'000'000 12:34:56 2024-01-15 +1 (555) 123-4567 0x1F 0b1010 1e-10 -42 +7 50% #1 No.5")
add("numbers_other_scripts", "١٢٣٤٥ ۱۲۳ १२३४ ௧௨௩ 一二三 ①②③ ½ ¾ ² ³ Ⅻ １２３４５ 𝟙𝟚𝟛")
add("digits_long", "9" * 200)
add("digits_mixed_letters", "abc123def4567ghi89012jkl3")

# Emoji.
add("emoji", "I ❤️ emoji 😀😃😄 👍🏽 👍🏿 🇯🇵🇺🇸 1️⃣ #️⃣")
add("emoji_zwj", "family 👨‍👩‍👧‍👦 flag 🏳️‍🌈 🏴‍☠️ woman technologist 👩🏾‍💻 couple 👩‍❤️‍💋‍👨")
add("emoji_only", "🎉🎉🎉🎊✨🔥💯")

# Whitespace.
add("spaces_runs", "a b  c   d    e     f      g       h" + " " * 16 + "i" + " " * 33 + "j")
add("tabs", "a\tb\t\tc\t\t\td\t \t e")
add("crlf", "one\r\ntwo\r\n\r\nthree\r\n")
add("newlines_3", "\n\n\n")
add("newlines_mixed", "a\n\n\nb\n \n c \n\t\n d\r\r\re")
add("trailing_spaces", "ends with spaces   ")
add("leading_spaces", "   starts with spaces")
add("only_space", " ")
add("only_spaces", "    ")
add("only_tab", "\t")
add("only_newline", "\n")
add("only_crlf", "\r\n")
add("only_mixed_ws", " \t\n \r\n\t ")
add("only_ideographic_space", "\u3000\u3000")
add("nbsp", "a\u00a0b\u00a0\u00a0c \u00a0 d\u2009e\u2003f\u202fg")
add("many_spaces_then_text", " " * 100 + "x")
add("space_before_newlines", "word   \n\n   word")

# Special-token strings inside text (DeepSeek-V3's added tokens are matched first).
add("special_bos", "<｜begin▁of▁sentence｜>Hello")
add("special_chat", "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>What is 2+2?<｜Assistant｜>4<｜end▁of▁sentence｜>")
add("special_think", "<｜User｜>Why?<｜Assistant｜><think>\nLet me reason step by step.\n</think>\n\nBecause.")
add("special_tools", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
add("special_adjacent", "x<｜User｜>y <｜User｜> z<｜User｜><｜User｜><｜Assistant｜>")
add("special_partial", "<｜User <｜User｜ ｜User｜> <｜｜> <|User|> <｜begin▁of▁sentence <｜end▁of▁sentence｜")
add("special_eot_fim", "<|EOT|> <｜fim▁begin｜>def f():<｜fim▁hole｜>\n<｜fim▁end｜>")
add("special_placeholder", "a<｜place▁holder▁no▁5｜>b<｜place▁holder▁no▁799｜>c<｜▁pad▁｜>")
add("special_only", "<｜end▁of▁sentence｜>")

# Unusual but valid Unicode.
add("replacement_char", "bad byte \ufffd here \ufffd\ufffd")
add("private_use", "\ue000\ue001\uf8ff \U000f0000 \U0010fffd")
add("noncharacters", "\ufffe \uffff \U0010ffff")
add("supplementary", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝑥² + 𝑦² 𠀀𠀁 𐍈 🄰")
add("controls", "bell\x07 esc\x1b[31m red\x1b[0m nul-free \x7f del \x01\x02")
add("zero_width", "zero\u200bwidth\u200cnon\u200djoiner \u2060 word joiner \u00ad soft hyphen")
add("bidi", "\u202eevil\u202c \u200fRTL mark \u2067isolate\u2069")
add("ascii_all", "".join(chr(c) for c in range(32, 127)))
add("latin1_all", "".join(chr(c) for c in range(0xA0, 0x100)))

# Long words (cache bypass and the heap merge path).
add("long_a", "a" * 1000)
add("long_word_repeated", "antidisestablishmentarianism" * 20)
add("long_ab", "ab" * 300)
add("long_base64", "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg" * 4)
add("long_hex", "0123456789abcdef" * 40)
add("long_url", "https://example.com/" + "/".join(f"segment{i}" for i in range(60)) + "?q=" + "&".join(f"k{i}=v{i}" for i in range(30)))
add("long_chinese", "人工智能" * 300)
add("long_punct", "=" * 500 + "-" * 300)
add("long_camel", "ThisIsAVeryLongCamelCaseIdentifierThatKeepsGoing" * 10)

add("empty", "")

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "corpus.jsonl"), "w", encoding="utf-8") as f:
    for c in cases:
        f.write(json.dumps(c, ensure_ascii=False) + "\n")
print(f"wrote {len(cases)} texts")
