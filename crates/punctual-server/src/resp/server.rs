//! The connection and server commands clients send on connect or by habit: `HELLO`, `AUTH`,
//! `PING`, `ECHO`, `SELECT`, `QUIT`, `RESET`, `INFO`, `CLIENT`, `CONFIG`, `COMMAND`.

use super::conn::{Conn, Step, wrong_args};
use super::events::Flags;
use super::frame::Reply;

/// The Redis version Punctual answers as, in `HELLO` and `INFO`: the command set it follows.
pub const REDIS_VERSION: &str = "7.2.0";

pub fn handles(lower: &str) -> bool {
    matches!(
        lower,
        "hello"
            | "auth"
            | "ping"
            | "echo"
            | "select"
            | "quit"
            | "reset"
            | "info"
            | "client"
            | "config"
            | "command"
    )
}

fn bulk(text: impl Into<Vec<u8>>) -> Reply {
    Reply::Bulk(text.into())
}

fn error(text: impl Into<String>) -> Step {
    Step::Reply(Reply::Error(text.into()))
}

/// Checks a password (a bearer token) and takes the user as the connection's group name.
fn authenticate(conn: &mut Conn, user: Option<&[u8]>, password: &[u8]) -> Result<(), Reply> {
    let password = String::from_utf8_lossy(password);
    if conn.service.auth_required() && !conn.service.token_accepted(&password) {
        return Err(Reply::Error(
            "WRONGPASS invalid username-password pair or user is disabled.".into(),
        ));
    }
    conn.authed = true;
    conn.user = user
        .map(|u| String::from_utf8_lossy(u).into_owned())
        .filter(|u| u != "default");
    Ok(())
}

fn hello(conn: &mut Conn, args: &[Vec<u8>]) -> Step {
    let mut i = 1;
    let mut version = if conn.resp3 { 3 } else { 2 };
    if let Some(arg) = args.get(1) {
        match std::str::from_utf8(arg)
            .ok()
            .and_then(|t| t.parse::<i64>().ok())
        {
            Some(2) => version = 2,
            Some(3) => version = 3,
            Some(_) => return error("NOPROTO unsupported protocol version"),
            None => return error("ERR Protocol version is not an integer or out of range"),
        }
        i = 2;
    }
    while i < args.len() {
        let option = args[i].to_ascii_lowercase();
        match option.as_slice() {
            b"auth" if i + 2 < args.len() => {
                let (user, password) = (args[i + 1].clone(), args[i + 2].clone());
                if let Err(reply) = authenticate(conn, Some(&user), &password) {
                    return Step::Reply(reply);
                }
                i += 3;
            }
            b"setname" if i + 1 < args.len() => {
                conn.name = Some(args[i + 1].clone());
                i += 2;
            }
            _ => {
                return error(format!(
                    "ERR Syntax error in HELLO option '{}'",
                    String::from_utf8_lossy(&args[i])
                ));
            }
        }
    }
    if !conn.authed {
        return error(
            "NOAUTH HELLO must be called with the client already authenticated, otherwise the \
             HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and \
             select the RESP protocol version at the same time",
        );
    }
    conn.resp3 = version == 3;
    Step::Reply(Reply::Map(vec![
        (bulk("server"), bulk("redis")),
        (bulk("version"), bulk(REDIS_VERSION)),
        (bulk("proto"), Reply::Integer(version)),
        (bulk("id"), Reply::Integer(conn.id as i64)),
        (bulk("mode"), bulk("standalone")),
        (bulk("role"), bulk("master")),
        (bulk("modules"), Reply::Array(Vec::new())),
    ]))
}

fn info(conn: &Conn) -> String {
    let mut text = String::new();
    text.push_str("# Server\r\n");
    text.push_str(&format!("redis_version:{REDIS_VERSION}\r\n"));
    text.push_str("redis_mode:standalone\r\n");
    text.push_str(&format!(
        "punctual_version:{}\r\n",
        env!("CARGO_PKG_VERSION")
    ));
    text.push_str("\r\n# Persistence\r\nloading:0\r\n");
    text.push_str("\r\n# Replication\r\nrole:master\r\n");
    text.push_str(&format!(
        "\r\n# Keyspace events\r\nnotify_keyspace_events:{}\r\nbroadcast:{}\r\n",
        conn.events.flags().normalised(),
        u8::from(conn.events.options.broadcast)
    ));
    text
}

/// `CONFIG GET` parameters: the ones Punctual has.
fn config_params(conn: &Conn) -> Vec<(&'static str, String)> {
    vec![
        ("notify-keyspace-events", conn.events.flags().normalised()),
        ("databases", conn.events.options.databases.to_string()),
    ]
}

fn config(conn: &mut Conn, args: &[Vec<u8>]) -> Step {
    let Some(sub) = args.get(1) else {
        return Step::Reply(wrong_args("config"));
    };
    match sub.to_ascii_lowercase().as_slice() {
        b"get" => {
            if args.len() < 3 {
                return Step::Reply(wrong_args("config|get"));
            }
            let mut pairs = Vec::new();
            for (name, value) in config_params(conn) {
                if args[2..]
                    .iter()
                    .any(|p| super::glob::matches(&p.to_ascii_lowercase(), name.as_bytes()))
                {
                    pairs.push((bulk(name), bulk(value)));
                }
            }
            Step::Reply(Reply::Map(pairs))
        }
        b"set" => {
            if args.len() < 4 || !args.len().is_multiple_of(2) {
                return Step::Reply(wrong_args("config|set"));
            }
            let mut flags = None;
            for pair in args[2..].chunks(2) {
                let name = String::from_utf8_lossy(&pair[0]).to_ascii_lowercase();
                if name != "notify-keyspace-events" {
                    return error(format!(
                        "ERR Unknown option or number of arguments for CONFIG SET - '{name}'"
                    ));
                }
                match Flags::parse(&pair[1]) {
                    Some(parsed) => flags = Some(parsed),
                    None => {
                        return error(
                            "ERR CONFIG SET failed (possibly related to argument \
                             'notify-keyspace-events') - Invalid event class character. Use \
                             'Ag$lshzxeKEtmdn'.",
                        );
                    }
                }
            }
            if let Some(flags) = flags {
                conn.events.set_flags(flags);
            }
            Step::Reply(Reply::ok())
        }
        b"resetstat" | b"rewrite" => Step::Reply(Reply::ok()),
        _ => error(format!(
            "ERR unknown subcommand '{}'. Try CONFIG HELP.",
            String::from_utf8_lossy(sub)
        )),
    }
}

fn client(conn: &mut Conn, args: &[Vec<u8>]) -> Step {
    let Some(sub) = args.get(1) else {
        return Step::Reply(wrong_args("client"));
    };
    match sub.to_ascii_lowercase().as_slice() {
        b"setinfo" if args.len() == 4 => Step::Reply(Reply::ok()),
        b"setname" if args.len() == 3 => {
            conn.name = Some(args[2].clone());
            Step::Reply(Reply::ok())
        }
        b"getname" => Step::Reply(conn.name.clone().map_or(Reply::Null, Reply::Bulk)),
        b"id" => Step::Reply(Reply::Integer(conn.id as i64)),
        b"info" | b"list" => Step::Reply(bulk(format!(
            "id={} name={} db={} sub={} psub={} resp={}\n",
            conn.id,
            String::from_utf8_lossy(conn.name.as_deref().unwrap_or_default()),
            conn.db,
            conn.channels.len(),
            conn.patterns.len(),
            if conn.resp3 { 3 } else { 2 }
        ))),
        b"setinfo" | b"setname" => Step::Reply(wrong_args("client")),
        _ => error(format!(
            "ERR unknown subcommand '{}'. Try CLIENT HELP.",
            String::from_utf8_lossy(sub)
        )),
    }
}

pub async fn run(conn: &mut Conn, lower: &str, args: &[Vec<u8>]) -> Step {
    let argc = args.len();
    match lower {
        "hello" => hello(conn, args),
        "auth" => match argc {
            2 => {
                Step::Reply(authenticate(conn, None, &args[1]).map_or_else(|e| e, |()| Reply::ok()))
            }
            3 => Step::Reply(
                authenticate(conn, Some(&args[1].clone()), &args[2].clone())
                    .map_or_else(|e| e, |()| Reply::ok()),
            ),
            _ => Step::Reply(wrong_args("auth")),
        },
        "ping" => {
            if argc > 2 {
                return Step::Reply(wrong_args("ping"));
            }
            if !conn.resp3 && conn.subscriptions() > 0 {
                let message = args.get(1).cloned().unwrap_or_default();
                return Step::Reply(Reply::Array(vec![bulk("pong"), Reply::Bulk(message)]));
            }
            Step::Reply(match args.get(1) {
                Some(message) => Reply::Bulk(message.clone()),
                None => Reply::Simple("PONG".into()),
            })
        }
        "echo" => match argc {
            2 => Step::Reply(Reply::Bulk(args[1].clone())),
            _ => Step::Reply(wrong_args("echo")),
        },
        "select" => {
            if argc != 2 {
                return Step::Reply(wrong_args("select"));
            }
            match std::str::from_utf8(&args[1])
                .ok()
                .and_then(|t| t.parse::<i64>().ok())
            {
                Some(db) if (0..i64::from(conn.events.options.databases)).contains(&db) => {
                    conn.db = db as u32;
                    Step::Reply(Reply::ok())
                }
                Some(_) => error("ERR DB index is out of range"),
                None => error("ERR value is not an integer or out of range"),
            }
        }
        "quit" => Step::Close(Reply::ok()),
        "reset" => {
            conn.channels.clear();
            conn.patterns.clear();
            conn.sync_subscriptions();
            conn.resp3 = false;
            conn.db = 0;
            conn.name = None;
            conn.authed = !conn.service.auth_required();
            conn.user = None;
            Step::Reply(Reply::Simple("RESET".into()))
        }
        "info" => Step::Reply(Reply::Verbatim("txt", info(conn))),
        "client" => client(conn, args),
        "config" => config(conn, args),
        "command" => match args.get(1).map(|a| a.to_ascii_lowercase()) {
            Some(sub) if sub == b"count" => Step::Reply(Reply::Integer(0)),
            Some(sub) if sub == b"docs" => Step::Reply(Reply::Map(Vec::new())),
            _ => Step::Reply(Reply::Array(Vec::new())),
        },
        _ => Step::Reply(super::conn::unknown(lower, args)),
    }
}
