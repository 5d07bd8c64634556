"""The page: one template; everything else is drawn by static/js/app.js from the JSON API."""
from flask import Blueprint, render_template

bp = Blueprint("pages", __name__)


@bp.get("/")
def index():
    return render_template("index.html")
