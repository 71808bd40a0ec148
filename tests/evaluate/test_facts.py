"""Key facts of a reference answer and which of them an answer states (doctune.evaluate.facts)."""

import pytest

from doctune.evaluate.facts import key_facts, number_key, score


def texts(reference):
    return [f.text for f in key_facts(reference)]


def kinds(reference):
    return [(f.kind, f.text) for f in key_facts(reference)]


# ------------------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("Lumen Relay listens on port 7300 by default.", [("name", "Relay"), ("number", "7300")]),
        (
            "The Team edition costs 6 euros per user per month.",
            [("name", "Team"), ("number", "6 euros")],
        ),
        (
            "It keeps logs for 30 days. The Pro plan stores 2.5 GB per user.",
            [("number", "30 days"), ("name", "Pro"), ("number", "2.5 GB")],
        ),
        (
            "Install version 1.4.2 with `pip install lumen-relay` and edit lumen.toml.",
            [("version", "1.4.2"), ("code", "pip install lumen-relay"), ("identifier", "lumen.toml")],
        ),
        (
            "The server prints \"ready\", then 'done', then “bye”.",
            [("quote", "ready"), ("quote", "done"), ("quote", "bye")],
        ),
        (
            "Uptime was 99.9% from March 15, 2024 to 2024-06-30; backups run at 02:30.",
            [("number", "99.9%"), ("date", "March 15, 2024"), ("date", "2024-06-30"), ("time", "02:30")],
        ),
        (
            "Set HF_HUB_OFFLINE and load SmolLM2 through the API of OpenAI.",
            [
                ("identifier", "HF_HUB_OFFLINE"),
                ("identifier", "SmolLM2"),
                ("identifier", "API"),
                ("identifier", "OpenAI"),
            ],
        ),
        (
            "In Paris, Marie Curie met the Bank of England.",
            [("name", "Paris"), ("name", "Marie Curie"), ("name", "Bank of England")],
        ),
        (
            "See https://lumen.example.com/docs, mail help@lumen.example.com or open /etc/lumen/lumen.toml.",
            [
                ("link", "https://lumen.example.com/docs"),
                ("link", "help@lumen.example.com"),
                ("link", "/etc/lumen/lumen.toml"),
            ],
        ),
        (
            "It handles 50 concurrent users, runs 10x faster at 100ms and costs $20 per seat.",
            [("number", "50"), ("number", "10x"), ("number", "100ms"), ("number", "$20")],
        ),
        (
            "Version v2.0.1 of LumenRelay fixed CVE-2024-1234.",
            [("version", "v2.0.1"), ("identifier", "LumenRelay"), ("identifier", "CVE-2024-1234")],
        ),
        (
            "1. Install it.\n2. Run it on 3 replicas.",
            [("number", "3 replicas")],
        ),  # list markers are not facts
    ],
)
def test_key_facts_of_real_answers(reference, expected):
    assert kinds(reference) == expected


@pytest.mark.parametrize(
    "reference",
    [
        "The answer is yes.",
        "It works. This is fine! Yes, it does? Use the default.",
        "Restart it.\nThen check the log.\n- Open the settings\n* Save",
        "No, you can't do that, it's the user's choice.",
        "Only one of them is enough; pick one.",  # a number word without a unit is no fact
    ],
)
def test_sentence_initial_capitals_and_apostrophes_are_no_facts(reference):
    assert key_facts(reference) == []
    assert score("anything", reference)["key_fact_recall"] is None


def test_a_repeated_fact_counts_once_and_order_follows_the_reference():
    assert texts("Port 7300. Use Lumen on port 7,300; Lumen says 7300.") == ["7300", "Lumen"]


def test_a_long_quote_is_no_fact_but_its_names_are():
    long = "a " * 50
    assert texts(f'He wrote "{long}to Lumen" once.') == ["Lumen"]


def test_fenced_code_is_no_fact():
    assert texts("Run:\n```\nlumen start --port 7300\n```\nthen wait 5 seconds.") == ["5 seconds"]


# ------------------------------------------------------------------------------------------ numbers


def test_numbers_are_compared_as_numbers():
    assert [number_key(x) for x in ["7300", "7,300", "7 300", "7\u00a0300", "7300.0"]] == ["7300"] * 5
    assert [number_key(x) for x in ["2.50", "2,5", "1,234.50", "0.5"]] == ["2.5", "2.5", "1234.5", "0.5"]


@pytest.mark.parametrize(
    ("answer", "hit"),
    [
        ("Port 7300.", True),
        ("It uses port 7,300 unless told otherwise.", True),
        ("7300", True),
        ("The default is 7300.0", True),
        ("Port 7000 by default.", False),
        ("Port 73000.", False),
        ("Port 17300.", False),
        ("Ports 7300-7310.", True),
        ("Version 7300.1 is out.", False),
    ],
)
def test_a_bare_number(answer, hit):
    assert score(answer, "Lumen listens on port 7300 by default.")["facts_hit"] == (["7300"] if hit else [])


@pytest.mark.parametrize(
    ("answer", "hit"),
    [
        ("The Team edition costs 6 euros per user per month.", True),
        ("6 EUR a month", True),
        ("€6 per user", True),
        ("6 € per user", True),
        ("6 Euro", True),
        ("It costs 6 dollars.", False),
        ("It costs $6.", False),
        ("It costs 6.", False),  # the reference names a unit: a bare number does not state it
        ("six euros", True),
        ("sixteen euros", False),
        ("10 euros, for 6 users", False),
        ("6 US dollars", False),
    ],
)
def test_a_number_with_a_unit_needs_the_same_unit(answer, hit):
    result = score(answer, "Each user costs 6 euros per month.")
    assert result["facts"] == ["6 euros"]
    assert result["facts_hit"] == (["6 euros"] if hit else [])


@pytest.mark.parametrize(
    ("reference", "answer", "hit"),
    [
        ("Logs are kept for 30 days.", "It keeps logs 30 calendar days.", True),
        ("Logs are kept for 30 days.", "Logs stay 30 weeks.", False),
        ("Logs are kept for 30 days.", "a 30-day retention", True),
        ("Each node needs 2.5 GB of memory.", "2.5GB", True),
        ("Each node needs 2.5 GB of memory.", "2.5 gigabytes", True),
        ("Each node needs 2.5 GB of memory.", "2.5 MB", False),
        ("Uptime is 99.9%.", "99.90 percent", True),
        ("Uptime is 99.9%.", "99.9 % uptime", True),
        ("Uptime is 99.9%.", "99%", False),
        ("Run 3 replicas.", "three replicas or 3 replica sets", True),
        ("Run 3 replicas.", "3 nodes", False),
        ("Timeouts after 250 ms.", "250 milliseconds", True),
        ("Setting 3 controls the speed.", "Setting 3 sets the speed.", True),  # a verb is no unit
        ("It serves 50 concurrent users.", "up to 50 users", True),  # nor an adjective
    ],
)
def test_units(reference, answer, hit):
    result = score(answer, reference)
    assert len(result["facts"]) == 1
    assert bool(result["facts_hit"]) is hit


# ------------------------------------------------------------------------------------------ other kinds


@pytest.mark.parametrize(
    ("reference", "answer", "hit"),
    [
        ("Ask the Team admin.", "Ask the team admin.", True),  # names: any case
        ("Ask the Team admin.", "Ask the teams admin.", False),  # whole words only
        ("Ask the Team admin.", "Ask a teammate.", False),
        ("It is made by Marie Curie.", "Marie\n  Curie made it.", True),
        ("It is made by Marie Curie.", "Curie made it.", False),
        ("Edit lumen.toml first.", "edit LUMEN.TOML", True),
        ("Edit lumen.toml first.", "edit lumen.yaml", False),
        ("Run `lumen start` first.", "type lumen start", True),
        ("Run `lumen start` first.", "type Lumen Start", False),  # code spans are exact
        ('Wait for "Ready".', "wait until it says ready", True),
        ('Wait for "Ready".', "wait until it is already up", False),
        ("Released on March 5, 2024.", "It came out 2024-03-05.", True),
        ("Released on March 5, 2024.", "It came out on 5 March 2024.", True),
        ("Released on March 5, 2024.", "It came out on March 6, 2024.", False),
        ("Install version 1.4.2.", "Use v1.4.2", True),
        ("Install version 1.4.2.", "Use 1.4.20", False),
        ("Backups run at 2:30.", "at 02:30 every night", True),
        ("See https://lumen.example.com/docs.", "Read https://lumen.example.com/docs please", True),
    ],
)
def test_matching_of_names_identifiers_spans_dates(reference, answer, hit):
    result = score(answer, reference)
    assert len(result["facts"]) == 1, result
    assert bool(result["facts_hit"]) is hit


def test_number_words_with_a_unit():
    reference = "Five; then it waits one minute before the next try."
    assert texts(reference) == ["one minute"]
    assert score("It waits 1 minute.", reference)["facts_hit"] == ["one minute"]
    assert score("It waits a minute.", reference)["facts_hit"] == []


def test_recall_is_the_share_of_facts_stated():
    reference = "Lumen Relay listens on port 7300; the Team edition costs 6 euros per user."
    assert score("Relay uses port 7300, Team costs 10 euros.", reference) == {
        "facts": ["Relay", "7300", "Team", "6 euros"],
        "facts_hit": ["Relay", "7300", "Team"],
        "key_fact_recall": 0.75,
    }
    assert score("", reference)["key_fact_recall"] == 0.0


# ------------------------------------------------------------------------------------------ other languages


@pytest.mark.parametrize(
    ("reference", "answer", "facts", "hit"),
    [
        (
            "Le serveur de Lumen écoute sur le port 7 300. Il coûte 6,50 € par mois.",
            "Lumen utilise le port 7300 et coûte 6.50 EUR.",
            ["Lumen", "7 300", "6,50 €"],
            ["Lumen", "7 300", "6,50 €"],
        ),
        (
            "El plan Team cuesta 6 euros al mes y guarda los datos 30 días.",
            "Team cuesta 6 dólares y guarda 30 días.",
            ["Team", "6 euros", "30 días"],
            ["Team", "30 días"],
        ),
        (
            "Der Dienst speichert „alles“ 30 Tage lang und kostet 6 Euro.",
            "Er speichert alles 30 Tage und kostet 6 Dollar.",
            ["Dienst", "alles", "30 Tage", "6 Euro"],  # German capitalises nouns: "Dienst" counts as a name
            ["alles", "30 Tage"],
        ),
        (
            "Сервер Lumen слушает порт 7300 в Москве.",
            "Lumen работает на порту 7300 в Москве.",
            ["Lumen", "7300", "Москве"],
            ["Lumen", "7300", "Москве"],
        ),
        (
            "服务器监听端口7300，费用为6欧元。",
            "端口是7300，价格6美元。",
            ["7300", "6欧元"],
            ["7300"],
        ),
        (
            "Il a dit «bonjour» à Zoë Müller.",
            "Zoë Müller a dit bonjour.",
            ["bonjour", "Zoë Müller"],
            ["bonjour", "Zoë Müller"],
        ),
    ],
)
def test_non_english_text(reference, answer, facts, hit):
    result = score(answer, reference)
    assert result["facts"] == facts
    assert result["facts_hit"] == hit


# ------------------------------------------------------------------------------------------ properties

REFERENCES = [
    "Lumen Relay listens on port 7300 by default.",
    "The Team edition costs 6 euros per user per month, the Pro edition €12.",
    "Uptime was 99.9% from March 15, 2024 to 2024-06-30; backups run at 02:30.",
    "Install version 1.4.2 with `pip install lumen-relay` and edit /etc/lumen/lumen.toml.",
    "Le serveur de Lumen écoute sur le port 7 300. Il coûte 6,50 € par mois.",
    "服务器监听端口7300，费用为6欧元。",
    'It prints "ready" after 2.5 s on SmolLM2 and HF_HOME.',
]


@pytest.mark.parametrize("reference", REFERENCES)
def test_a_reference_states_all_its_own_facts(reference):
    result = score(reference, reference)
    assert result["facts"] and result["key_fact_recall"] == 1.0
