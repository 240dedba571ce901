"""export package of seminar-tf."""
