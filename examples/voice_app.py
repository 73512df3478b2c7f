"""A voice-agent app: routes each call, follows its events, moves it to billing mid-call.
Policy rule: `ask_webhook: {url: http://HOST:8081/call-initiated, ...}`; controller settings:
webhook_url http://HOST:8081/events, webhook_secret = WEBHOOK_SECRET."""
import hashlib, hmac, json, os, time  # noqa: E401
from aiohttp import ClientSession, web

API, TOKEN, SECRET = os.environ["CALLFABRIC_API"], os.environ["CALLFABRIC_TOKEN"], os.environ["WEBHOOK_SECRET"]


async def verified(request):  # header Callfabric-Signature: t=<unix>,v1=<hex hmac-sha256(secret, "<t>.<body>")>
    body, sig = await request.read(), dict(p.split("=", 1) for p in request.headers["Callfabric-Signature"].split(","))
    mac = hmac.new(SECRET.encode(), f"{sig['t']}.".encode() + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(mac, sig["v1"]) or abs(time.time() - int(sig["t"])) > 300:
        raise web.HTTPUnauthorized()
    return json.loads(body)


async def call_initiated(request):  # answer with the same actions as policy rules
    call = (await verified(request))["data"]  # from, to, dialled, headers, tenant …
    agent = "vip" if call["from"] in ("+14155550100",) else "intake"
    return web.json_response({"actions": [{"route_agent": agent}, {"fork": "stt"}]})


async def events(request):
    event = await verified(request)
    print(event["type"], event["call_id"], event["data"], flush=True)
    if event["type"] == "fork.started":  # live STT copy running: hand the caller to billing
        async with ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            await http.post(f"{API}/calls/{event['call_id']}/actions", json={"action": {"route_agent": "billing"}})
    return web.Response()

app = web.Application()
app.add_routes([web.post("/call-initiated", call_initiated), web.post("/events", events)])
if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8081")))
