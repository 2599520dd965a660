"""The adapter to Heroku: an httpx client for the Platform and Data APIs, and a simulator of both."""
