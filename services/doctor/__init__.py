"""`python -m services.doctor DOMAIN`: is a sending domain ready for bulk mail through Mailrail?"""
