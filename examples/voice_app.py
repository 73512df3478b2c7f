"""A voice-agent app for the shipped policies (policies/): their `partner-webhook` rule asks it
where calls to +18005550300 go; it follows the calls' events and moves a caller to the billing
agent mid-call. Controller settings: webhook_url http://127.0.0.1:8081/hooks/events and
webhook_secret = $WEBHOOK_SECRET; CALLFABRIC_API (http://127.0.0.1:8460) and a control-scope
CALLFABRIC_TOKEN for the REST API. Live-call actions need a media node (Asterisk, or `callfabric up`'s stand-in)."""
import hashlib, hmac, json, os, time  # noqa: E401
from aiohttp import ClientSession, web

API = os.environ["CALLFABRIC_API"].rstrip("/").removesuffix("/v1") + "/v1"
TOKEN, SECRET = os.environ["CALLFABRIC_TOKEN"], os.environ["WEBHOOK_SECRET"]
VIP = {"+14155550100", "+14155550101"}  # the policy's vip-callers


async def verified(request):  # header Callfabric-Signature: t=<unix>,v1=<hex hmac-sha256(secret, "<t>.<body>")>
    body, sig = await request.read(), dict(p.split("=", 1) for p in request.headers["Callfabric-Signature"].split(","))
    mac = hmac.new(SECRET.encode(), f"{sig['t']}.".encode() + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(mac, sig["v1"]) or abs(time.time() - int(sig["t"])) > 300:
        raise web.HTTPUnauthorized()
    return json.loads(body)


async def call_initiated(request):  # answer with the same actions as policy rules, names the policy declares
    call = (await verified(request))["data"]  # from, to, dialled, headers, tenant …
    if call["from"] in VIP:
        return web.json_response({"actions": [{"route_sip": "vip-desk"}, {"add_headers": {"X-VIP": "yes"}}]})
    return web.json_response({"actions": [{"route_agent": "intake"}, {"fork": "stt"}]})


async def events(request):
    event = await verified(request)
    print(event["type"], event["call_id"], event["data"], flush=True)
    if event["type"] == "fork.started":  # live STT copy running: hand the caller to billing
        async with ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            await http.post(f"{API}/calls/{event['call_id']}/actions", json={"action": {"route_agent": "billing"}})
    return web.Response()

app = web.Application()
app.add_routes([web.post("/hooks/call-initiated", call_initiated), web.post("/hooks/events", events)])
if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8081")))
