"""preprocessing package of seminar-tf."""
