"""serving package of seminar-tf."""
