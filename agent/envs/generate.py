"""Regenerate the built-in environments' data with a fixed seed.

    python -m agent.envs.generate          # rewrites agent/envs/*/tasks.jsonl, demos.jsonl
                                           # and agent/envs/docs_qa/corpus/*.md

The invented company handbook (Quillmoor Robotics) is defined once here as data; the corpus,
the docs-qa questions and the delegate tasks are all written from it, so an answer always
matches the documents. Facts are split into train and test facts (never both), so a model
tuned on the train split cannot have memorised a test answer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from tools.builtins import evaluate, format_number

SEED = 20250611
HERE = Path(__file__).parent
N_TRAIN, N_TEST = 210, 105

# --- the invented company ---------------------------------------------------------------------

COMPANY = "Quillmoor Robotics"
HISTORY = {
    "founded": 2011,
    "founders": "Maren Quill and Tobias Moorcroft",
    "first_product": "the QM-100 Linen Folder",
    "hq_city": "Bergen",
    "employees": 1372,
}
# city, country, opened, desks, floors, meeting rooms, parking spaces, head, street address
OFFICES = [
    ("Bergen", "Norway", 2011, 312, 6, 24, 85, "Astrid Hegreberg", "Kjøttbasaren 4"),
    ("Oslo", "Norway", 2014, 148, 3, 12, 40, "Ingrid Solvang", "Tollbugata 17"),
    ("Lisbon", "Portugal", 2016, 96, 2, 9, 18, "Duarte Valente", "Rua do Alecrim 58"),
    ("Tallinn", "Estonia", 2017, 74, 2, 7, 22, "Kadri Lepik", "Telliskivi 60a"),
    ("Montreal", "Canada", 2018, 131, 4, 11, 57, "Simone Archambault", "1250 Rue Ottawa"),
    ("Osaka", "Japan", 2019, 88, 3, 8, 12, "Haruto Imaizumi", "2-14 Nakanoshima"),
    ("Valparaiso", "Chile", 2020, 53, 1, 5, 9, "Camila Errazuriz", "Avenida Brasil 1931"),
    ("Nairobi", "Kenya", 2021, 67, 2, 6, 31, "Wanjiru Kamau", "Riverside Drive 88"),
    ("Krakow", "Poland", 2022, 119, 3, 10, 26, "Tomasz Wierzba", "ul. Lubicz 23"),
    ("Dundee", "Scotland", 2023, 45, 1, 4, 14, "Fiona MacAskill", "14 Riverside Esplanade"),
]
# code, name, family, list price EUR, weight kg, battery hours, payload kg, launch year
PRODUCTS = [
    ("QR-210", "Ferrule Picker", "grippers", 4860, 3.4, 9.5, 1.2, 2015),
    ("QR-215", "Softhand Mini", "grippers", 3125, 1.8, 11.0, 0.6, 2017),
    ("QR-230", "Vacuum Petal", "grippers", 2790, 2.1, 14.0, 2.5, 2019),
    ("QR-260", "Tendon Claw", "grippers", 6240, 4.7, 7.5, 5.0, 2022),
    ("QA-400", "Heron Arm", "arms", 18750, 27.5, 6.0, 8.0, 2014),
    ("QA-420", "Kestrel Arm", "arms", 22400, 31.0, 5.5, 12.0, 2016),
    ("QA-450", "Cormorant Arm", "arms", 35900, 48.2, 4.0, 25.0, 2019),
    ("QA-470", "Wren Arm", "arms", 9980, 11.4, 8.0, 3.0, 2021),
    ("QA-490", "Albatross Arm", "arms", 51200, 73.0, 3.5, 40.0, 2024),
    ("QM-100", "Linen Folder", "mobile", 14300, 62.0, 10.0, 15.0, 2012),
    ("QM-310", "Shelf Runner", "mobile", 27650, 95.5, 12.5, 120.0, 2016),
    ("QM-330", "Dock Mule", "mobile", 38900, 140.0, 9.0, 300.0, 2018),
    ("QM-350", "Aisle Scout", "mobile", 11850, 24.3, 16.0, 4.0, 2020),
    ("QM-380", "Pallet Otter", "mobile", 46700, 210.0, 8.5, 650.0, 2023),
    ("QS-020", "Lumen Sensor Bar", "sensors", 1240, 0.9, 30.0, 0.0, 2017),
    ("QS-045", "Depth Lattice", "sensors", 2980, 1.6, 22.0, 0.0, 2021),
]
# name, role, office, start year, badge number
PEOPLE = [
    ("Maren Quill", "Chief Executive Officer", "Bergen", 2011, 1001),
    ("Tobias Moorcroft", "Chief Technology Officer", "Bergen", 2011, 1002),
    ("Astrid Hegreberg", "Head of the Bergen office", "Bergen", 2012, 1007),
    ("Ingrid Solvang", "Head of the Oslo office", "Oslo", 2014, 1044),
    ("Duarte Valente", "Head of the Lisbon office", "Lisbon", 2016, 1102),
    ("Kadri Lepik", "Head of the Tallinn office", "Tallinn", 2017, 1158),
    ("Simone Archambault", "Head of the Montreal office", "Montreal", 2018, 1203),
    ("Haruto Imaizumi", "Head of the Osaka office", "Osaka", 2019, 1266),
    ("Camila Errazuriz", "Head of the Valparaiso office", "Valparaiso", 2020, 1311),
    ("Wanjiru Kamau", "Head of the Nairobi office", "Nairobi", 2021, 1347),
    ("Tomasz Wierzba", "Head of the Krakow office", "Krakow", 2022, 1389),
    ("Fiona MacAskill", "Head of the Dundee office", "Dundee", 2023, 1420),
    ("Leif Brandtzaeg", "Chief Financial Officer", "Oslo", 2015, 1071),
    ("Yusra Haddad", "Head of People", "Lisbon", 2016, 1109),
    ("Oskar Vähi", "Lead Firmware Engineer", "Tallinn", 2017, 1161),
    ("Priya Raghunathan", "Director of Safety", "Montreal", 2018, 1210),
    ("Kenji Moriyama", "Head of Sensor Research", "Osaka", 2019, 1270),
    ("Beatriz Lagos", "Sales Director for the Americas", "Valparaiso", 2020, 1315),
    ("Otieno Ochieng", "Field Service Manager", "Nairobi", 2021, 1352),
    ("Agnieszka Zawada", "Head of Quality Assurance", "Krakow", 2022, 1393),
    ("Callum Strachan", "Marine Robotics Lead", "Dundee", 2023, 1424),
    ("Sigrid Aarvik", "Head of Design", "Bergen", 2013, 1019),
    ("Mateus Coelho", "Warehouse Systems Architect", "Lisbon", 2019, 1284),
    ("Elin Fjeldstad", "General Counsel", "Oslo", 2016, 1096),
    ("Rafael Quintanilla", "Head of Customer Support", "Montreal", 2020, 1322),
    ("Noor Asante", "Head of Learning and Development", "Nairobi", 2022, 1398),
]
# key, file, sentence, question, answer, unit (None = text answer)
POLICIES = [
    (
        "vacation_days",
        "policy-leave",
        "Every employee gets {v} days of paid vacation per calendar year.",
        "How many days of paid vacation does a Quillmoor employee get per year?",
        27,
        "days",
    ),
    (
        "carry_over",
        "policy-leave",
        "Up to {v} unused vacation days may be carried over into the next year.",
        "How many unused vacation days can be carried over to the next year at Quillmoor?",
        5,
        "days",
    ),
    (
        "parental_leave",
        "policy-leave",
        "Parents receive {v} weeks of fully paid parental leave.",
        "How many weeks of fully paid parental leave does Quillmoor give?",
        20,
        "weeks",
    ),
    (
        "sick_self_cert",
        "policy-leave",
        "Employees may self-certify sickness for up to {v} consecutive days before a doctor's note is needed.",
        "For how many consecutive days can a Quillmoor employee self-certify sickness?",
        4,
        "days",
    ),
    (
        "sabbatical_years",
        "policy-leave",
        "After {v} years of service an employee may take an unpaid sabbatical of up to three months.",
        "After how many years of service can a Quillmoor employee take a sabbatical?",
        7,
        "years",
    ),
    (
        "remote_days",
        "policy-remote-work",
        "Staff may work remotely up to {v} days per week.",
        "How many days per week may Quillmoor staff work remotely?",
        3,
        "days",
    ),
    (
        "core_start",
        "policy-remote-work",
        "Core hours start at {v}:00 local time and everyone should be reachable from then.",
        "At what hour do Quillmoor's core hours start?",
        10,
        "hour",
    ),
    (
        "home_office",
        "policy-remote-work",
        "A one-off home office allowance of {v} euros covers a desk and a chair.",
        "How large is Quillmoor's one-off home office allowance in euros?",
        650,
        "EUR",
    ),
    (
        "internet",
        "policy-remote-work",
        "Remote workers can claim {v} euros per month towards their internet connection.",
        "How much can a Quillmoor remote worker claim per month for internet, in euros?",
        35,
        "EUR",
    ),
    (
        "meal_allowance",
        "policy-travel-expenses",
        "The meal allowance on business trips is {v} euros per day.",
        "What is Quillmoor's daily meal allowance on business trips, in euros?",
        42,
        "EUR",
    ),
    (
        "hotel_cap",
        "policy-travel-expenses",
        "Hotels are reimbursed up to {v} euros per night.",
        "Up to how many euros per night does Quillmoor reimburse for hotels?",
        165,
        "EUR",
    ),
    (
        "mileage_rate",
        "policy-travel-expenses",
        "Driving a private car for work is reimbursed at {v} euros per kilometre.",
        "What mileage rate does Quillmoor pay per kilometre driven in a private car?",
        0.48,
        "EUR",
    ),
    (
        "flight_class_hours",
        "policy-travel-expenses",
        "Business class is allowed only on flights longer than {v} hours.",
        "On flights longer than how many hours does Quillmoor allow business class?",
        8,
        "hours",
    ),
    (
        "receipt_days",
        "policy-travel-expenses",
        "Receipts must be submitted within {v} days of the trip.",
        "Within how many days must Quillmoor travel receipts be submitted?",
        30,
        "days",
    ),
    (
        "approval_limit",
        "policy-travel-expenses",
        "Any single expense above {v} euros needs the approval of the office head.",
        "Above what amount in euros does a single expense need the office head's approval at Quillmoor?",
        750,
        "EUR",
    ),
    (
        "laptop_refresh",
        "policy-equipment",
        "Laptops are replaced every {v} years.",
        "How often, in years, are Quillmoor laptops replaced?",
        3,
        "years",
    ),
    (
        "phone_budget",
        "policy-equipment",
        "The budget for a work phone is {v} euros.",
        "What is the budget for a Quillmoor work phone, in euros?",
        520,
        "EUR",
    ),
    (
        "monitor_count",
        "policy-equipment",
        "Each desk is fitted with {v} monitors.",
        "How many monitors is each Quillmoor desk fitted with?",
        2,
        "monitors",
    ),
    (
        "robot_loan_days",
        "policy-equipment",
        "Demo robots can be borrowed for at most {v} days.",
        "For at most how many days can a demo robot be borrowed at Quillmoor?",
        14,
        "days",
    ),
    (
        "training_budget",
        "policy-training",
        "Each employee has a training budget of {v} euros per year.",
        "What is the yearly training budget per Quillmoor employee, in euros?",
        1800,
        "EUR",
    ),
    (
        "conference_limit",
        "policy-training",
        "Each employee may attend up to {v} conferences a year at company cost.",
        "How many conferences a year may a Quillmoor employee attend at company cost?",
        2,
        "conferences",
    ),
    (
        "mentoring_hours",
        "policy-training",
        "New hires get {v} hours of mentoring during their first quarter.",
        "How many hours of mentoring do new Quillmoor hires get in their first quarter?",
        24,
        "hours",
    ),
    (
        "probation_months",
        "policy-training",
        "The probation period for new hires is {v} months.",
        "How long, in months, is the probation period at Quillmoor?",
        6,
        "months",
    ),
    (
        "safety_course_hours",
        "policy-safety",
        "Everyone who works near robots must complete a {v}-hour safety course.",
        "How many hours long is Quillmoor's robot safety course?",
        16,
        "hours",
    ),
    (
        "safety_refresh_months",
        "policy-safety",
        "The safety course must be refreshed every {v} months.",
        "Every how many months must Quillmoor's safety course be refreshed?",
        18,
        "months",
    ),
    (
        "cell_speed",
        "policy-safety",
        "Inside a shared work cell robot arms are limited to {v} millimetres per second.",
        "What speed limit, in millimetres per second, applies to robot arms in a shared work cell at Quillmoor?",
        250,
        "mm/s",
    ),
    (
        "estop_test_days",
        "policy-safety",
        "Emergency stop buttons are tested every {v} days.",
        "How often, in days, are emergency stop buttons tested at Quillmoor?",
        7,
        "days",
    ),
    (
        "oncall_pay",
        "policy-safety",
        "Engineers on call are paid {v} euros per week of on-call duty.",
        "How much is a Quillmoor engineer paid per week of on-call duty, in euros?",
        310,
        "EUR",
    ),
    (
        "badge_colour",
        "policy-safety",
        "Visitors wear {v} badges and must be escorted at all times.",
        "What colour badges do visitors wear at Quillmoor?",
        "orange",
        None,
    ),
    (
        "fire_drill",
        "policy-safety",
        "Fire drills take place every {v} in every office.",
        "How often do fire drills take place in Quillmoor offices?",
        "March and September",
        None,
    ),
]
FAMILY_TITLES = {
    "grippers": "Grippers",
    "arms": "Robot arms",
    "mobile": "Mobile robots",
    "sensors": "Sensors",
}

# --- corpus ----------------------------------------------------------------------------------


def corpus_files() -> dict[str, str]:
    """File name -> markdown text of the invented handbook."""
    files: dict[str, str] = {}
    h = HISTORY
    files["company-overview.md"] = (
        f"# {COMPANY}\n\n{COMPANY} builds robots for warehouses, laundries and harbours. The "
        f"company was founded in {h['founded']} by {h['founders']} in {h['hq_city']}, where its "
        f"headquarters still is. It employs {h['employees']} people in {len(OFFICES)} offices.\n\n"
        "Product codes start with QR (grippers), QA (robot arms), QM (mobile robots) or QS "
        "(sensors).\n"
    )
    files["history.md"] = (
        f"# History\n\n{h['founders']} founded {COMPANY} in {h['founded']}. The first product was "
        f"{h['first_product']}, sold to hotel laundries from 2012. "
        + " ".join(f"The {o[0]} office opened in {o[2]}." for o in OFFICES[1:])
        + "\n"
    )
    for city, country, opened, desks, floors, rooms, parking, head, address in OFFICES:
        files[f"office-{city.lower()}.md"] = (
            f"# The {city} office\n\nThe {city} office ({country}) is at {address}. It opened in "
            f"{opened} and is led by {head}. It has {desks} desks on {floors} "
            f"floor{'s' if floors > 1 else ''}, {rooms} meeting rooms and {parking} parking "
            "spaces.\n\nVisitors sign in at the front desk on the ground floor.\n"
        )
    for family, title in FAMILY_TITLES.items():
        lines = [f"# Product catalogue: {title.lower()}\n"]
        for code, name, fam, price, weight, battery, payload, launched in PRODUCTS:
            if fam != family:
                continue
            payload_text = (
                f" and carries up to {format_number(payload)} kg" if payload else ", no payload"
            )
            lines.append(
                f"## {code} {name}\n\nThe {name} (product code {code}) launched in {launched}. "
                f"Its list price is {price:,} euros. It weighs {format_number(weight)} kg"
                f"{payload_text}, and its battery lasts {format_number(battery)} hours.\n"
            )
        files[f"products-{family}.md"] = "\n".join(lines)
    by_office: dict[str, list[tuple]] = {}
    for p in PEOPLE:
        by_office.setdefault(_people_group(p), []).append(p)
    for group, people in by_office.items():
        lines = [f"# People directory: {group}\n"]
        for name, role, office, start, badge in people:
            lines.append(
                f"- **{name}**: {role}, based in the {office} office, joined in {start}, "
                f"badge number {badge}."
            )
        files[f"people-{group}.md"] = "\n".join(lines) + "\n"
    for key in dict.fromkeys(p[1] for p in POLICIES):
        title = key.removeprefix("policy-").replace("-", " ")
        lines = [f"# Policy: {title}\n"]
        lines += [
            sentence.format(v=_policy_text(v)) for _, f, sentence, _, v, _ in POLICIES if f == key
        ]
        files[f"{key}.md"] = lines[0] + "\n" + " ".join(lines[1:]) + "\n"
    files["glossary.md"] = (
        "# Glossary\n\n- **Work cell**: a fenced area where people and robot arms work together.\n"
        "- **Dock**: a charging station for mobile robots.\n"
        "- **Field service**: repairs done at the customer's site.\n"
    )
    return files


_EUROPE = {"Bergen", "Oslo", "Lisbon", "Tallinn", "Krakow", "Dundee"}


def _people_group(person: tuple) -> str:
    """Which people-directory file lists this person."""
    if person[3] <= 2015:
        return "leadership"
    return "europe" if person[2] in _EUROPE else "world"


def _policy_text(v) -> str:
    return format_number(v) if isinstance(v, int | float) else str(v)


# --- docs-qa ---------------------------------------------------------------------------------


EURO, KG = r"euros?|EUR|€", r"kg|kilograms?"
# policy units -> the regex the numeric grader looks for after the number ("27 days")
POLICY_UNITS = {
    "days": "days?",
    "weeks": "weeks?",
    "years": "years?",
    "months": "months?",
    "hours": "hours?",
    "EUR": EURO,
    "monitors": "monitors?",
    "conferences": "conferences?",
    "mm/s": "mm|millimet(?:re|er)s?",
}


def docs_facts() -> list[dict]:
    """Every question-answer fact of the handbook: prompt, answer, grader, source file."""
    facts = []

    def add(prompt: str, answer, source: str, grader: str = "numeric", **meta) -> None:
        facts.append(
            {"prompt": prompt, "answer": answer, "grader": grader, "source": source, **meta}
        )

    h = HISTORY
    add("In which year was Quillmoor Robotics founded?", h["founded"], "company-overview.md")
    add(
        "How many people does Quillmoor Robotics employ?",
        h["employees"],
        "company-overview.md",
        unit="people|employees",
    )
    add(
        "Who founded Quillmoor Robotics?",
        ["Maren Quill", "Tobias Moorcroft"],
        "history.md",
        "contains",
    )
    add("What was Quillmoor Robotics' first product?", ["Linen Folder"], "history.md", "contains")
    add(
        "In which city is Quillmoor Robotics headquartered?",
        ["Bergen"],
        "company-overview.md",
        "contains",
    )
    for city, country, opened, desks, floors, rooms, parking, head, address in OFFICES:
        src = f"office-{city.lower()}.md"
        add(f"How many desks does Quillmoor's {city} office have?", desks, src, unit="desks?")
        add(
            f"How many floors does the Quillmoor {city} office occupy?", floors, src, unit="floors?"
        )
        add(
            f"How many meeting rooms are there in Quillmoor's {city} office?",
            rooms,
            src,
            unit="meeting rooms?",
        )
        add(
            f"How many parking spaces does the Quillmoor {city} office have?",
            parking,
            src,
            unit="parking spaces?",
        )
        add(f"In which year did Quillmoor open its {city} office?", opened, src)
        add(f"Who leads Quillmoor's {city} office?", [head], src, "contains")
        add(f"What is the street address of Quillmoor's {city} office?", [address], src, "contains")
        add(f"In which country is Quillmoor's {city} office?", [country], src, "contains")
    for code, name, family, price, weight, battery, payload, launched in PRODUCTS:
        src = f"products-{family}.md"
        add(f"What is the list price in euros of Quillmoor's {code}?", price, src, unit=EURO)
        add(f"How much does the Quillmoor {name} weigh, in kilograms?", weight, src, unit=KG)
        add(
            f"How many hours does the battery of the Quillmoor {code} last?",
            battery,
            src,
            unit="hours?",
        )
        add(f"In which year was the Quillmoor {name} launched?", launched, src)
        if payload:
            add(f"What payload in kilograms can the Quillmoor {code} carry?", payload, src, unit=KG)
        add(f"What is the product code of Quillmoor's {name}?", [code], src, "contains")
        add(f"What is the name of the Quillmoor product with code {code}?", [name], src, "contains")
    for person in PEOPLE:
        name, role, office, start, badge = person
        src = f"people-{_people_group(person)}.md"
        if not role.startswith("Head of the"):  # office heads are asked "who leads ..." above
            add(f"What is {name}'s role at Quillmoor Robotics?", [role], src, "contains")
        add(f"Which Quillmoor office is {name} based in?", [office], src, "contains")
        add(f"In which year did {name} join Quillmoor Robotics?", start, src)
        add(f"What is {name}'s badge number at Quillmoor?", badge, src)
    for _key, file, _s, question, value, unit in POLICIES:
        if unit is None:
            add(question, [value], f"{file}.md", "contains")
        else:
            add(question, value, f"{file}.md", unit=POLICY_UNITS.get(unit))
    return facts


def docs_tasks(rng: random.Random) -> list[dict]:
    facts = docs_facts()
    rng.shuffle(facts)
    n_test = max(N_TEST, len(facts) // 3)
    tasks = []
    for i, f in enumerate(facts):
        meta = {"requires_tools": ["search"], "source": f["source"]}
        if f.get("unit"):
            meta["unit"] = f["unit"]  # the numeric grader reads the number written before it
        tasks.append(
            {
                "id": f"docs-{i:04d}",
                "prompt": f["prompt"],
                "answer": f["answer"],
                "grader": f["grader"],
                "split": "test" if i < n_test else "train",
                "metadata": meta,
            }
        )
    return sorted(tasks, key=lambda t: (t["split"] != "train", t["id"]))


# --- calculator ------------------------------------------------------------------------------

NAMES = [
    "Amara",
    "Bastian",
    "Chiara",
    "Dmitri",
    "Elif",
    "Farid",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Keiko",
    "Lars",
    "Mina",
    "Nils",
    "Olga",
    "Pavel",
    "Rosa",
    "Samir",
    "Tove",
    "Uma",
]
ITEMS = [
    "notebooks",
    "garden chairs",
    "light bulbs",
    "bags of rice",
    "printer cartridges",
    "tins of paint",
    "bicycle helmets",
    "boxes of tea",
    "desk lamps",
    "water filters",
]


def _money(rng: random.Random, lo: int, hi: int) -> str:
    return f"{rng.randint(lo, hi)}.{rng.randint(0, 99):02d}"


def _word_problem_templates() -> list[tuple[str, Callable[[random.Random], tuple[str, str, dict]]]]:
    """word-problems: (name, make(rng) -> (prompt, expression, extra metadata)). Many need a
    step that is not in the text (x 12 months, x 3600 seconds, 1 - p/100); the base SmolLM2
    solved 1 of 192 such tries at temperature 1 with two demonstrations, so these measure what
    tuning cannot bootstrap (see issue #8)."""

    def shopping(r):
        n, a, item, p = r.choice(NAMES), r.randint(12, 97), r.choice(ITEMS), _money(r, 3, 89)
        return (
            f"{n} buys {a} {item} at ${p} each. How much does {n} pay in total?",
            f"{a} * {p}",
            {},
        )

    def travel(r):
        v, h = r.randint(112, 298), r.choice([2.5, 3.5, 4.25, 5.75, 6.5, 7.25])
        return (
            f"A train runs at an average of {v} km/h for {h} hours. How many kilometres "
            "does it cover?",
            f"{v} * {h}",
            {},
        )

    def area(r):
        w, l_ = r.randint(101, 489), r.randint(101, 489)
        return (
            f"A warehouse floor measures {w} m by {l_} m. What is its area in square metres?",
            f"{w} * {l_}",
            {},
        )

    def percent(r):
        p, n = r.randint(11, 89), r.randint(1200, 98000)
        return f"What is {p}% of {n:,}?", f"{n} * {p} / 100", {}

    def discount(r):
        price, p = r.randint(350, 4800), r.choice([12, 15, 18, 22, 25, 35, 40])
        return (
            f"A laptop costs ${price:,}. It is on sale at {p}% off. What is the sale price in "
            "dollars?",
            f"{price} * (1 - {p} / 100)",
            {},
        )

    def unit_price(r):
        n, c = r.randint(7, 48), _money(r, 40, 390)
        return (
            f"A pack of {n} rechargeable batteries costs ${c}. What is the price of one "
            "battery, to the nearest cent?",
            f"round({c} / {n}, 2)",
            {"abs_tol": 0.005},
        )

    def sharing(r):
        n, b = r.randint(3, 14), _money(r, 180, 2400)
        return (
            f"{n} colleagues split a restaurant bill of ${b} equally. How much does each "
            "pay, to the nearest cent?",
            f"round({b} / {n}, 2)",
            {"abs_tol": 0.005},
        )

    def salary(r):
        n, w, h = r.choice(NAMES), _money(r, 17, 64), r.randint(118, 176)
        return (
            f"{n} earns ${w} per hour and works {h} hours every month. How much does {n} "
            "earn in a year?",
            f"{w} * {h} * 12",
            {},
        )

    def fuel(r):
        lit, d = r.choice([4.7, 5.3, 6.1, 6.8, 7.4, 8.2, 9.6]), r.randint(380, 2950)
        return (
            f"A car uses {lit} litres of fuel per 100 km. How many litres does it need for a "
            f"{d:,} km trip?",
            f"{lit} * {d} / 100",
            {},
        )

    def speed(r):
        d, h = r.randint(95, 480), r.choice([3, 4, 6, 7, 8, 9])
        return (
            f"A cyclist covers {d} km in {h} hours. What is the average speed in km/h, to two "
            "decimal places?",
            f"round({d} / {h}, 2)",
            {"abs_tol": 0.005},
        )

    def production(r):
        a, d = r.randint(1150, 8900), r.randint(13, 62)
        return (
            f"A factory makes {a:,} bolts per day. How many bolts does it make in {d} days?",
            f"{a} * {d}",
            {},
        )

    def seats(r):
        rows, s = r.randint(38, 96), r.randint(112, 348)
        return (
            f"A stadium has {rows} rows with {s} seats in each row. How many seats does it have?",
            f"{rows} * {s}",
            {},
        )

    def savings(r):
        p, rate = r.randint(1500, 48000), r.choice([1.5, 2.25, 3.1, 3.75, 4.2, 5.5])
        return (
            f"You put ${p:,} in a savings account that pays {rate}% interest once a year. How "
            "much is in the account after one year?",
            f"{p} * (1 + {rate} / 100)",
            {},
        )

    def currency(r):
        x, e = r.choice([1.0842, 1.1276, 0.8561, 1.4713, 11.4925]), r.randint(240, 9800)
        return (
            f"One euro is worth {x} units of another currency. How many units is {e:,} euros?",
            f"{e} * {x}",
            {},
        )

    def tank(r):
        c, a, b = r.randint(9000, 25000), r.randint(1200, 3900), r.randint(1100, 3800)
        return (
            f"A tank holds {c:,} litres. {a:,} litres are used on Monday and {b:,} on "
            "Tuesday. How many litres are left?",
            f"{c} - {a} - {b}",
            {},
        )

    def volume(r):
        a, b, c = r.randint(23, 98), r.randint(23, 98), r.randint(14, 77)
        return (
            f"A shipping box is {a} cm long, {b} cm wide and {c} cm high. What is its volume "
            "in cubic centimetres?",
            f"{a} * {b} * {c}",
            {},
        )

    def machine(r):
        s, h = r.choice([4, 5, 6, 8, 9, 12, 15, 16]), r.randint(7, 23)
        return (
            f"A machine makes one part every {s} seconds. How many parts does it make in {h} "
            "hours?",
            f"{h} * 3600 / {s}",
            {},
        )

    def tiles(r):
        t, n = r.choice([0.25, 0.36, 0.45, 0.6, 0.75]), r.randint(140, 960)
        area_ = format_number(evaluate(f"{t} * {n}"))
        return (
            f"A floor of {area_} square metres is covered with tiles of {t} square metres "
            "each. How many tiles are needed?",
            f"{area_} / {t}",
            {},
        )

    def vat(r):
        x, p = _money(r, 240, 9800), r.choice([8, 12.5, 19, 20, 21, 25])
        return (
            f"An invoice of ${x} gets {p}% VAT added. What is the total, to the nearest cent?",
            f"round({x} * (1 + {p} / 100), 2)",
            {"abs_tol": 0.005},
        )

    def wages_team(r):
        n, w, d = r.randint(6, 38), r.randint(142, 389), r.randint(11, 26)
        return (
            f"A team of {n} workers each earn ${w} per day. What do they earn together in "
            f"{d} working days?",
            f"{n} * {w} * {d}",
            {},
        )

    return [
        (f.__name__, f)
        for f in (
            shopping,
            travel,
            area,
            percent,
            discount,
            unit_price,
            sharing,
            salary,
            fuel,
            speed,
            production,
            seats,
            savings,
            currency,
            tank,
            volume,
            machine,
            tiles,
            vat,
            wages_team,
        )
    ]


def _calc_templates() -> list[tuple[str, Callable[[random.Random], tuple[str, str, dict]]]]:
    """calculator: (name, make(rng) -> (prompt, expression, extra metadata)). Every number the
    expression needs is written in the question and the words say which operation; each kind
    comes in two or three phrasings. The numbers are too large for a 135M model's head."""

    def pick(r, *phrasings):
        return r.choice(phrasings)

    def shopping(r):
        n, a, item, p = r.choice(NAMES), r.randint(12, 97), r.choice(ITEMS), _money(r, 3, 89)
        return (
            pick(
                r,
                f"{n} buys {a} {item} at ${p} each. How much does {n} pay in total?",
                f"What do {a} {item} cost at ${p} each?",
                f"{item.capitalize()} cost ${p} each. {n} orders {a}. What is the bill?",
            ),
            f"{a} * {p}",
            {},
        )

    def travel(r):
        v, h = r.randint(112, 298), r.choice([2.5, 3.5, 4.25, 5.75, 6.5, 7.25])
        return (
            pick(
                r,
                f"A train runs at {v} km/h for {h} hours. How many kilometres does it cover?",
                f"How far does a car go in {h} hours at {v} km/h, in km?",
            ),
            f"{v} * {h}",
            {},
        )

    def area(r):
        w, l_ = r.randint(101, 489), r.randint(101, 489)
        return (
            pick(
                r,
                f"A warehouse floor measures {w} m by {l_} m. What is its area in square metres?",
                f"A field is {w} metres long and {l_} metres wide. What is its area?",
            ),
            f"{w} * {l_}",
            {},
        )

    def seats(r):
        rows, s = r.randint(38, 96), r.randint(112, 348)
        return (
            pick(
                r,
                f"A stadium has {rows} rows with {s} seats in each row. How many seats does it "
                "have?",
                f"A hall has {rows} rows of {s} chairs. How many chairs are there?",
            ),
            f"{rows} * {s}",
            {},
        )

    def production(r):
        a, d = r.randint(1150, 8900), r.randint(13, 62)
        return (
            pick(
                r,
                f"A factory makes {a:,} bolts per day. How many bolts does it make in {d} days?",
                f"A bakery bakes {a:,} rolls a day. How many rolls does it bake in {d} days?",
            ),
            f"{a} * {d}",
            {},
        )

    def crates(r):
        k, n = r.randint(24, 96), r.randint(35, 420)
        return (
            pick(
                r,
                f"A crate holds {k} jars. How many jars are in {n} crates?",
                f"There are {n} boxes with {k} pencils in each box. How many pencils are there?",
            ),
            f"{n} * {k}",
            {},
        )

    def rent(r):
        m, rent_ = r.randint(7, 36), r.randint(650, 4800)
        return (
            pick(
                r,
                f"The rent is ${rent_:,} per month. How much rent is paid over {m} months?",
                f"An office costs ${rent_:,} a month to rent. What do {m} months cost?",
            ),
            f"{rent_} * {m}",
            {},
        )

    def currency(r):
        x, e = r.choice([1.0842, 1.1276, 0.8561, 1.4713, 11.4925]), r.randint(240, 9800)
        return (
            pick(
                r,
                f"One euro is worth {x} dollars. How many dollars is {e:,} euros?",
                f"At {x} francs per euro, how many francs do you get for {e:,} euros?",
            ),
            f"{e} * {x}",
            {},
        )

    def books(r):
        a, b = r.randint(1200, 9800), r.randint(1200, 9800)
        return (
            pick(
                r,
                f"A library has {a:,} novels and {b:,} comics. How many books does it have in all?",
                f"A farm picked {a:,} apples and {b:,} pears. How many fruits is that altogether?",
            ),
            f"{a} + {b}",
            {},
        )

    def sales(r):
        a, b, c = (r.randint(850, 6400) for _ in range(3))
        return (
            pick(
                r,
                f"A shop sold {a:,} items on Monday, {b:,} on Tuesday and {c:,} on Wednesday. "
                "How many items did it sell in the three days?",
                f"Three trucks carry {a:,} kg, {b:,} kg and {c:,} kg. What is the total load "
                "in kg?",
            ),
            f"{a} + {b} + {c}",
            {},
        )

    def withdraw(r):
        a, b = r.randint(3200, 48000), r.randint(300, 2900)
        return (
            pick(
                r,
                f"An account holds ${a:,}. ${b:,} is withdrawn. How much is left?",
                f"A school has a budget of ${a:,} and spends ${b:,}. How much money remains?",
            ),
            f"{a} - {b}",
            {},
        )

    def tank(r):
        c, a, b = r.randint(9000, 25000), r.randint(1200, 3900), r.randint(1100, 3800)
        return (
            pick(
                r,
                f"A tank holds {c:,} litres. {a:,} litres are used on Monday and {b:,} on "
                "Tuesday. How many litres are left?",
                f"A warehouse stores {c:,} boxes. {a:,} are shipped in May and {b:,} in June. "
                "How many boxes remain?",
            ),
            f"{c} - {a} - {b}",
            {},
        )

    def heights(r):
        a, b = r.randint(3100, 8800), r.randint(1200, 3000)
        return (
            pick(
                r,
                f"One mountain is {a:,} m high and another is {b:,} m high. How much higher is "
                "the first, in metres?",
                f"A plane flies at {a:,} m and a balloon at {b:,} m. What is the difference in "
                "height, in metres?",
            ),
            f"{a} - {b}",
            {},
        )

    def prize(r):
        n, q = r.randint(6, 48), r.randint(120, 980)
        return (
            pick(
                r,
                f"A prize of ${n * q:,} is shared equally by {n} winners. How much does each "
                "winner get?",
                f"{n} friends split a bill of ${n * q:,} equally. How much does each pay?",
            ),
            f"{n * q} / {n}",
            {},
        )

    def trip(r):
        v, h = r.randint(45, 120), r.randint(6, 38)
        return (
            pick(
                r,
                f"How many hours does a {v * h:,} km trip take at {v} km/h?",
                f"A ship sails {v * h:,} km at {v} km/h. How many hours does the voyage take?",
            ),
            f"{v * h} / {v}",
            {},
        )

    def volume(r):
        a, b, c = r.randint(23, 98), r.randint(23, 98), r.randint(14, 77)
        return (
            f"A shipping box is {a} cm long, {b} cm wide and {c} cm high. What is its volume "
            "in cubic centimetres?",
            f"{a} * {b} * {c}",
            {},
        )

    def wages(r):
        n, w, d = r.randint(6, 38), r.randint(142, 389), r.randint(11, 26)
        return (
            pick(
                r,
                f"A team of {n} workers each earn ${w} per day. What do they earn together in "
                f"{d} days?",
                f"Each of {n} guides is paid ${w} a day. What are they paid in total for {d} days?",
            ),
            f"{n} * {w} * {d}",
            {},
        )

    def printer(r):
        a, d, bad = r.randint(850, 2400), r.randint(12, 48), r.randint(300, 2900)
        return (
            f"A printer prints {a:,} pages a day for {d} days, and {bad:,} pages are spoiled. "
            "How many good pages are there?",
            f"{a} * {d} - {bad}",
            {},
        )

    return [
        (f.__name__, f)
        for f in (
            shopping,
            travel,
            area,
            seats,
            production,
            crates,
            rent,
            currency,
            books,
            sales,
            withdraw,
            tank,
            heights,
            prize,
            trip,
            volume,
            wages,
            printer,
        )
    ]


def calculator_tasks(rng: random.Random) -> list[dict]:
    return _template_tasks(rng, _calc_templates(), "calc")


def word_problem_tasks(rng: random.Random) -> list[dict]:
    return _template_tasks(rng, _word_problem_templates(), "wp")


def _template_tasks(rng: random.Random, templates: list, prefix: str) -> list[dict]:
    tasks, seen = [], set()
    for split, count in (("train", N_TRAIN), ("test", N_TEST)):
        made = 0
        while made < count:
            name, make = templates[(len(tasks)) % len(templates)]
            prompt, expression, extra = make(rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            answer = _clean(evaluate(expression))
            meta = {"requires_tools": ["calculator"], "expression": expression, "template": name}
            tasks.append(
                {
                    "id": f"{prefix}-{len(tasks):04d}",
                    "prompt": prompt,
                    "answer": answer,
                    "hint": f"call the calculator with {expression}",
                    "grader": "numeric",
                    "split": split,
                    "metadata": {**meta, **extra},
                }
            )
            made += 1
    return tasks


# --- delegate --------------------------------------------------------------------------------


def delegate_facts() -> list[dict]:
    """Numeric handbook facts the researcher can look up: what to ask and the value."""
    facts = []
    for city, _c, _o, desks, _floors, rooms, parking, _h, _a in OFFICES:
        facts.append(
            {
                "what": f"the number of desks in the {city} office",
                "value": desks,
                "kind": "desks",
                "subject": f"the {city} office",
            }
        )
        facts.append(
            {
                "what": f"the number of meeting rooms in the {city} office",
                "value": rooms,
                "kind": "rooms",
                "subject": f"the {city} office",
            }
        )
        facts.append(
            {
                "what": f"the number of parking spaces at the {city} office",
                "value": parking,
                "kind": "parking",
                "subject": f"the {city} office",
            }
        )
    for code, name, _f, price, weight, battery, _p, _l in PRODUCTS:
        facts.append(
            {
                "what": f"the list price of the {code} {name}",
                "value": price,
                "kind": "price",
                "subject": f"the {code} {name}",
            }
        )
        facts.append(
            {
                "what": f"the weight of the {code} {name}",
                "value": weight,
                "kind": "weight",
                "subject": f"the {code} {name}",
            }
        )
        facts.append(
            {
                "what": f"the battery life of the {code} {name}",
                "value": battery,
                "kind": "battery",
                "subject": f"the {code} {name}",
            }
        )
    for key, _f, _s, _q, value, _unit in POLICIES:
        if key in ("meal_allowance", "hotel_cap", "mileage_rate", "training_budget", "oncall_pay"):
            facts.append(
                {
                    "what": f"Quillmoor's {key.replace('_', ' ')}",
                    "value": value,
                    "kind": key,
                    "subject": key,
                }
            )
    return facts


def _delegate_prompt(r: random.Random, f: dict) -> tuple[str, str]:
    """A task needing `f` looked up, and the expression that answers it (with {v} for the fact)."""
    k = r.randint(3, 47)
    ask = f"Ask the researcher for {f['what']}, then compute with the calculator."
    s = f["subject"]
    kind = f["kind"]
    if kind == "desks":
        opts = [
            (
                f"How many desks would {k} offices the size of {s} need in total? {ask}",
                f"{k} * {{v}}",
            ),
            (f"If {s} added {k} desks, how many desks would it have? {ask}", f"{{v}} + {k}"),
        ]
    elif kind == "rooms":
        opts = [
            (
                f"Each meeting room in {s} is booked {k} times a week. How many bookings is that per week across the office? {ask}",
                f"{{v}} * {k}",
            )
        ]
    elif kind == "parking":
        opts = [
            (
                f"{s[0].upper() + s[1:]} rents out its parking spaces at {k} euros per month each. What is the yearly income? {ask}",
                f"{{v}} * {k} * 12",
            )
        ]
    elif kind == "price":
        opts = [
            (
                f"A customer orders {k} units of {s}. What is the total list price in euros? {ask}",
                f"{k} * {{v}}",
            ),
            (
                f"A customer gets {k}% off the list price of {s}. What do they pay in euros? {ask}",
                f"{{v}} * (1 - {k} / 100)",
            ),
        ]
    elif kind == "weight":
        opts = [(f"How many kilograms do {k} units of {s} weigh together? {ask}", f"{k} * {{v}}")]
    elif kind == "battery":
        opts = [(f"How many hours of work do {k} full charges of {s} give? {ask}", f"{k} * {{v}}")]
    elif kind == "meal_allowance":
        opts = [
            (
                f"A team of {k} people travels for 4 days. What is the total meal allowance in euros? {ask}",
                f"{k} * 4 * {{v}}",
            )
        ]
    elif kind == "hotel_cap":
        opts = [
            (
                f"What is the most Quillmoor reimburses for {k} hotel nights, in euros? {ask}",
                f"{k} * {{v}}",
            )
        ]
    elif kind == "mileage_rate":
        km = r.randint(120, 2400)
        opts = [
            (
                f"An employee drives {km} km in a private car for work. How many euros are reimbursed? {ask}",
                f"{km} * {{v}}",
            )
        ]
    elif kind == "training_budget":
        opts = [
            (
                f"What is the total yearly training budget of a team of {k} employees, in euros? {ask}",
                f"{k} * {{v}}",
            )
        ]
    else:  # oncall_pay
        opts = [
            (
                f"An engineer is on call for {k} weeks. How many euros of on-call pay is that? {ask}",
                f"{k} * {{v}}",
            )
        ]
    return r.choice(opts)


def delegate_tasks(rng: random.Random) -> list[dict]:
    facts = delegate_facts()
    rng.shuffle(facts)
    n_test_facts = len(facts) // 3
    tasks, seen = [], set()
    for split, pool, count in (
        ("train", facts[n_test_facts:], N_TRAIN),
        ("test", facts[:n_test_facts], N_TEST),
    ):
        made = 0
        while made < count:
            f = pool[made % len(pool)]
            prompt, template = _delegate_prompt(rng, f)
            if prompt in seen:
                continue
            seen.add(prompt)
            expression = template.format(v=format_number(f["value"]))
            tasks.append(
                {
                    "id": f"delegate-{len(tasks):04d}",
                    "prompt": prompt,
                    "answer": _clean(evaluate(expression)),
                    "grader": "numeric",
                    "split": split,
                    "metadata": {
                        "requires_tools": ["researcher", "calculator"],
                        "expression": expression,
                        "lookup": f["what"],
                        "lookup_value": f["value"],
                        "abs_tol": 1e-6,
                    },
                }
            )
            made += 1
    return tasks


# --- demonstrations --------------------------------------------------------------------------


def _call(call_id: str, name: str, arguments: dict) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _tool_turn(call_id: str, name: str, content: str) -> dict:
    return {"role": "tool", "tool_call_id": call_id, "name": name, "content": content}


def calculator_demos() -> list[dict]:
    e1 = "37 * 48.75"
    e2a, e2b = "1284 * 36", "46224 - 2750"
    r1, r2a, r2b = (format_number(evaluate(e)) for e in (e1, e2a, e2b))
    return [
        {
            "messages": [
                {
                    "role": "user",
                    "content": "Wiebke buys 37 folding tables at $48.75 each. How much does she pay in total?",
                },
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [_call("call_1", "calculator", {"expression": e1})],
                },
                _tool_turn("call_1", "calculator", r1),
                # a terse final answer that repeats the tool's result: a 135M model imitates
                # "37 * 48.75 = ..." by doing the arithmetic itself, and gets it wrong
                {"role": "assistant", "content": f"The answer is {r1}."},
            ]
        },
        {
            "messages": [
                {
                    "role": "user",
                    "content": "A printer prints 1,284 pages a day for 36 days, and 2,750 pages are spoiled. How many good pages are there?",
                },
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [_call("call_1", "calculator", {"expression": e2a})],
                },
                _tool_turn("call_1", "calculator", r2a),
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [_call("call_2", "calculator", {"expression": e2b})],
                },
                _tool_turn("call_2", "calculator", r2b),
                {"role": "assistant", "content": f"The answer is {r2b}."},
            ]
        },
    ]


def _passage(source: str, text: str) -> str:
    # exactly what the search tool shows the model
    from retrieval.search import Passage, format_passages

    return format_passages([Passage(id=f"{source}#0", text=text, source=source, score=0.71)])


def docs_demos(files: dict[str, str]) -> list[dict]:
    glossary = files["glossary.md"].split("\n\n", 1)[1].strip()
    overview = files["company-overview.md"].split("\n\n")[1].strip()
    return [
        {
            "messages": [
                {"role": "user", "content": "At Quillmoor Robotics, what is a dock?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [_call("call_1", "search", {"query": "dock definition"})],
                },
                _tool_turn("call_1", "search", _passage("glossary.md", glossary)),
                {"role": "assistant", "content": "A dock is a charging station for mobile robots."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "What do Quillmoor Robotics' robots do?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        _call("call_1", "search", {"query": "what Quillmoor Robotics builds"})
                    ],
                },
                _tool_turn("call_1", "search", _passage("company-overview.md", overview)),
                {
                    "role": "assistant",
                    "content": "Quillmoor Robotics builds robots for warehouses, laundries and harbours.",
                },
            ]
        },
    ]


def delegate_demos() -> list[dict]:
    # facts the tasks do not use as lookups: the Bergen office's floors, the QS-020 launch year
    expression = "6 * 4"
    result = format_number(evaluate(expression))
    return [
        {
            "messages": [
                {
                    "role": "user",
                    "content": "Each floor of the Bergen office needs 4 first-aid kits. How many kits does the office need? Ask the researcher for the number of floors of the Bergen office, then compute with the calculator.",
                },
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        _call(
                            "call_1",
                            "researcher",
                            {"task": "How many floors does Quillmoor's Bergen office have?"},
                        )
                    ],
                },
                _tool_turn("call_1", "researcher", "The Bergen office has 6 floors."),
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [_call("call_2", "calculator", {"expression": expression})],
                },
                _tool_turn("call_2", "calculator", result),
                {
                    "role": "assistant",
                    "content": f"The Bergen office has 6 floors, so it needs 6 * 4 = {result} first-aid kits.",
                },
            ]
        },
    ]


# --- writing ---------------------------------------------------------------------------------


def _clean(value: float) -> int | float:
    """A computed answer without float noise (3609.0000000000005 -> 3609), as the calculator
    prints it."""
    text = format_number(value)
    number = float(text)
    return int(number) if number.is_integer() and "e" not in text else number


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate(root: Path = HERE, seed: int = SEED) -> dict[str, int]:
    """Write every built-in environment's tasks, demos and corpus under `root`; return counts."""
    rng = random.Random(seed)
    files = corpus_files()
    corpus = root / "docs_qa" / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for old in corpus.glob("*.md"):
        old.unlink()
    for name, text in files.items():
        (corpus / name).write_text(text, encoding="utf-8")
    out = {}
    # word-problems draws first from the shared stream (it was the first calculator), so the
    # docs-qa and delegate tasks stay what they were; calculator has a stream of its own
    for env, tasks, demos in (
        ("word_problems", word_problem_tasks(rng), calculator_demos()),
        ("calculator", calculator_tasks(random.Random(seed + 1)), calculator_demos()),
        ("docs_qa", docs_tasks(rng), docs_demos(files)),
        ("delegate", delegate_tasks(rng), delegate_demos()),
    ):
        _write_jsonl(root / env / "tasks.jsonl", tasks)
        _write_jsonl(root / env / "demos.jsonl", demos)
        out[env] = len(tasks)
    out["corpus_files"] = len(files)
    return out


if __name__ == "__main__":
    print(generate())
