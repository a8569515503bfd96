"""Quillmoor Robotics, the invented company of the docs-qa and delegate environments, as data.

docs_qa/make.py writes the handbook (docs_qa/corpus/*.md) and its questions from these
tables, and delegate/make.py its lookups, so an answer always matches the documents. Nothing
here is random: regenerating one environment never changes the company the other one reads.
"""

from __future__ import annotations

from typing import NamedTuple

COMPANY = "Quillmoor Robotics"
HISTORY = {
    "founded": 2011,
    "founders": "Maren Quill and Tobias Moorcroft",
    "first_product": "the QM-100 Linen Folder",
    "hq_city": "Bergen",
    "employees": 1372,
}


class Office(NamedTuple):
    city: str
    country: str
    opened: int
    desks: int
    floors: int
    rooms: int  # meeting rooms
    parking: int  # parking spaces
    head: str
    address: str


class Product(NamedTuple):
    code: str
    name: str
    family: str  # a key of FAMILY_TITLES
    price: int  # list price, euros
    weight: float  # kg
    battery: float  # hours
    payload: float  # kg; 0 for sensors
    launched: int


class Person(NamedTuple):
    name: str
    role: str
    office: str
    joined: int
    badge: int


class Policy(NamedTuple):
    key: str
    file: str  # the handbook file (without .md) that states it
    value: int | float | str
    unit: str | None  # None: a text answer
    sentence: str  # how the handbook states it, {v} for the value
    question: str


# fmt: off
OFFICES = [
    Office("Bergen", "Norway", 2011, 312, 6, 24, 85, "Astrid Hegreberg", "Kjøttbasaren 4"),
    Office("Oslo", "Norway", 2014, 148, 3, 12, 40, "Ingrid Solvang", "Tollbugata 17"),
    Office("Lisbon", "Portugal", 2016, 96, 2, 9, 18, "Duarte Valente", "Rua do Alecrim 58"),
    Office("Tallinn", "Estonia", 2017, 74, 2, 7, 22, "Kadri Lepik", "Telliskivi 60a"),
    Office("Montreal", "Canada", 2018, 131, 4, 11, 57, "Simone Archambault", "1250 Rue Ottawa"),
    Office("Osaka", "Japan", 2019, 88, 3, 8, 12, "Haruto Imaizumi", "2-14 Nakanoshima"),
    Office("Valparaiso", "Chile", 2020, 53, 1, 5, 9, "Camila Errazuriz", "Avenida Brasil 1931"),
    Office("Nairobi", "Kenya", 2021, 67, 2, 6, 31, "Wanjiru Kamau", "Riverside Drive 88"),
    Office("Krakow", "Poland", 2022, 119, 3, 10, 26, "Tomasz Wierzba", "ul. Lubicz 23"),
    Office("Dundee", "Scotland", 2023, 45, 1, 4, 14, "Fiona MacAskill", "14 Riverside Esplanade"),
]
FAMILY_TITLES = {
    "grippers": "Grippers", "arms": "Robot arms", "mobile": "Mobile robots", "sensors": "Sensors",
}
PRODUCTS = [
    Product("QR-210", "Ferrule Picker", "grippers", 4860, 3.4, 9.5, 1.2, 2015),
    Product("QR-215", "Softhand Mini", "grippers", 3125, 1.8, 11.0, 0.6, 2017),
    Product("QR-230", "Vacuum Petal", "grippers", 2790, 2.1, 14.0, 2.5, 2019),
    Product("QR-260", "Tendon Claw", "grippers", 6240, 4.7, 7.5, 5.0, 2022),
    Product("QA-400", "Heron Arm", "arms", 18750, 27.5, 6.0, 8.0, 2014),
    Product("QA-420", "Kestrel Arm", "arms", 22400, 31.0, 5.5, 12.0, 2016),
    Product("QA-450", "Cormorant Arm", "arms", 35900, 48.2, 4.0, 25.0, 2019),
    Product("QA-470", "Wren Arm", "arms", 9980, 11.4, 8.0, 3.0, 2021),
    Product("QA-490", "Albatross Arm", "arms", 51200, 73.0, 3.5, 40.0, 2024),
    Product("QM-100", "Linen Folder", "mobile", 14300, 62.0, 10.0, 15.0, 2012),
    Product("QM-310", "Shelf Runner", "mobile", 27650, 95.5, 12.5, 120.0, 2016),
    Product("QM-330", "Dock Mule", "mobile", 38900, 140.0, 9.0, 300.0, 2018),
    Product("QM-350", "Aisle Scout", "mobile", 11850, 24.3, 16.0, 4.0, 2020),
    Product("QM-380", "Pallet Otter", "mobile", 46700, 210.0, 8.5, 650.0, 2023),
    Product("QS-020", "Lumen Sensor Bar", "sensors", 1240, 0.9, 30.0, 0.0, 2017),
    Product("QS-045", "Depth Lattice", "sensors", 2980, 1.6, 22.0, 0.0, 2021),
]
PEOPLE = [
    Person("Maren Quill", "Chief Executive Officer", "Bergen", 2011, 1001),
    Person("Tobias Moorcroft", "Chief Technology Officer", "Bergen", 2011, 1002),
    Person("Astrid Hegreberg", "Head of the Bergen office", "Bergen", 2012, 1007),
    Person("Ingrid Solvang", "Head of the Oslo office", "Oslo", 2014, 1044),
    Person("Duarte Valente", "Head of the Lisbon office", "Lisbon", 2016, 1102),
    Person("Kadri Lepik", "Head of the Tallinn office", "Tallinn", 2017, 1158),
    Person("Simone Archambault", "Head of the Montreal office", "Montreal", 2018, 1203),
    Person("Haruto Imaizumi", "Head of the Osaka office", "Osaka", 2019, 1266),
    Person("Camila Errazuriz", "Head of the Valparaiso office", "Valparaiso", 2020, 1311),
    Person("Wanjiru Kamau", "Head of the Nairobi office", "Nairobi", 2021, 1347),
    Person("Tomasz Wierzba", "Head of the Krakow office", "Krakow", 2022, 1389),
    Person("Fiona MacAskill", "Head of the Dundee office", "Dundee", 2023, 1420),
    Person("Leif Brandtzaeg", "Chief Financial Officer", "Oslo", 2015, 1071),
    Person("Yusra Haddad", "Head of People", "Lisbon", 2016, 1109),
    Person("Oskar Vähi", "Lead Firmware Engineer", "Tallinn", 2017, 1161),
    Person("Priya Raghunathan", "Director of Safety", "Montreal", 2018, 1210),
    Person("Kenji Moriyama", "Head of Sensor Research", "Osaka", 2019, 1270),
    Person("Beatriz Lagos", "Sales Director for the Americas", "Valparaiso", 2020, 1315),
    Person("Otieno Ochieng", "Field Service Manager", "Nairobi", 2021, 1352),
    Person("Agnieszka Zawada", "Head of Quality Assurance", "Krakow", 2022, 1393),
    Person("Callum Strachan", "Marine Robotics Lead", "Dundee", 2023, 1424),
    Person("Sigrid Aarvik", "Head of Design", "Bergen", 2013, 1019),
    Person("Mateus Coelho", "Warehouse Systems Architect", "Lisbon", 2019, 1284),
    Person("Elin Fjeldstad", "General Counsel", "Oslo", 2016, 1096),
    Person("Rafael Quintanilla", "Head of Customer Support", "Montreal", 2020, 1322),
    Person("Noor Asante", "Head of Learning and Development", "Nairobi", 2022, 1398),
]
POLICIES = [
    Policy("vacation_days", "policy-leave", 27, "days",
           "Every employee gets {v} days of paid vacation per calendar year.",
           "How many days of paid vacation does a Quillmoor employee get per year?"),
    Policy("carry_over", "policy-leave", 5, "days",
           "Up to {v} unused vacation days may be carried over into the next year.",
           "How many unused vacation days can be carried over to the next year at Quillmoor?"),
    Policy("parental_leave", "policy-leave", 20, "weeks",
           "Parents receive {v} weeks of fully paid parental leave.",
           "How many weeks of fully paid parental leave does Quillmoor give?"),
    Policy("sick_self_cert", "policy-leave", 4, "days",
           "Employees may self-certify sickness for up to {v} consecutive days before a "
           "doctor's note is needed.",
           "For how many consecutive days can a Quillmoor employee self-certify sickness?"),
    Policy("sabbatical_years", "policy-leave", 7, "years",
           "After {v} years of service an employee may take an unpaid sabbatical of up to "
           "three months.",
           "After how many years of service can a Quillmoor employee take a sabbatical?"),
    Policy("remote_days", "policy-remote-work", 3, "days",
           "Staff may work remotely up to {v} days per week.",
           "How many days per week may Quillmoor staff work remotely?"),
    Policy("core_start", "policy-remote-work", 10, "hour",
           "Core hours start at {v}:00 local time and everyone should be reachable from then.",
           "At what hour do Quillmoor's core hours start?"),
    Policy("home_office", "policy-remote-work", 650, "EUR",
           "A one-off home office allowance of {v} euros covers a desk and a chair.",
           "How large is Quillmoor's one-off home office allowance in euros?"),
    Policy("internet", "policy-remote-work", 35, "EUR",
           "Remote workers can claim {v} euros per month towards their internet connection.",
           "How much can a Quillmoor remote worker claim per month for internet, in euros?"),
    Policy("meal_allowance", "policy-travel-expenses", 42, "EUR",
           "The meal allowance on business trips is {v} euros per day.",
           "What is Quillmoor's daily meal allowance on business trips, in euros?"),
    Policy("hotel_cap", "policy-travel-expenses", 165, "EUR",
           "Hotels are reimbursed up to {v} euros per night.",
           "Up to how many euros per night does Quillmoor reimburse for hotels?"),
    Policy("mileage_rate", "policy-travel-expenses", 0.48, "EUR",
           "Driving a private car for work is reimbursed at {v} euros per kilometre.",
           "What mileage rate does Quillmoor pay per kilometre driven in a private car?"),
    Policy("flight_class_hours", "policy-travel-expenses", 8, "hours",
           "Business class is allowed only on flights longer than {v} hours.",
           "On flights longer than how many hours does Quillmoor allow business class?"),
    Policy("receipt_days", "policy-travel-expenses", 30, "days",
           "Receipts must be submitted within {v} days of the trip.",
           "Within how many days must Quillmoor travel receipts be submitted?"),
    Policy("approval_limit", "policy-travel-expenses", 750, "EUR",
           "Any single expense above {v} euros needs the approval of the office head.",
           "Above what amount in euros does a single expense need the office head's approval "
           "at Quillmoor?"),
    Policy("laptop_refresh", "policy-equipment", 3, "years",
           "Laptops are replaced every {v} years.",
           "How often, in years, are Quillmoor laptops replaced?"),
    Policy("phone_budget", "policy-equipment", 520, "EUR",
           "The budget for a work phone is {v} euros.",
           "What is the budget for a Quillmoor work phone, in euros?"),
    Policy("monitor_count", "policy-equipment", 2, "monitors",
           "Each desk is fitted with {v} monitors.",
           "How many monitors is each Quillmoor desk fitted with?"),
    Policy("robot_loan_days", "policy-equipment", 14, "days",
           "Demo robots can be borrowed for at most {v} days.",
           "For at most how many days can a demo robot be borrowed at Quillmoor?"),
    Policy("training_budget", "policy-training", 1800, "EUR",
           "Each employee has a training budget of {v} euros per year.",
           "What is the yearly training budget per Quillmoor employee, in euros?"),
    Policy("conference_limit", "policy-training", 2, "conferences",
           "Each employee may attend up to {v} conferences a year at company cost.",
           "How many conferences a year may a Quillmoor employee attend at company cost?"),
    Policy("mentoring_hours", "policy-training", 24, "hours",
           "New hires get {v} hours of mentoring during their first quarter.",
           "How many hours of mentoring do new Quillmoor hires get in their first quarter?"),
    Policy("probation_months", "policy-training", 6, "months",
           "The probation period for new hires is {v} months.",
           "How long, in months, is the probation period at Quillmoor?"),
    Policy("safety_course_hours", "policy-safety", 16, "hours",
           "Everyone who works near robots must complete a {v}-hour safety course.",
           "How many hours long is Quillmoor's robot safety course?"),
    Policy("safety_refresh_months", "policy-safety", 18, "months",
           "The safety course must be refreshed every {v} months.",
           "Every how many months must Quillmoor's safety course be refreshed?"),
    Policy("cell_speed", "policy-safety", 250, "mm/s",
           "Inside a shared work cell robot arms are limited to {v} millimetres per second.",
           "What speed limit, in millimetres per second, applies to robot arms in a shared work "
           "cell at Quillmoor?"),
    Policy("estop_test_days", "policy-safety", 7, "days",
           "Emergency stop buttons are tested every {v} days.",
           "How often, in days, are emergency stop buttons tested at Quillmoor?"),
    Policy("oncall_pay", "policy-safety", 310, "EUR",
           "Engineers on call are paid {v} euros per week of on-call duty.",
           "How much is a Quillmoor engineer paid per week of on-call duty, in euros?"),
    Policy("badge_colour", "policy-safety", "orange", None,
           "Visitors wear {v} badges and must be escorted at all times.",
           "What colour badges do visitors wear at Quillmoor?"),
    Policy("fire_drill", "policy-safety", "March and September", None,
           "Fire drills take place every {v} in every office.",
           "How often do fire drills take place in Quillmoor offices?"),
]
# fmt: on
