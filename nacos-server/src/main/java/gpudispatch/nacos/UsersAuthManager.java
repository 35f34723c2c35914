package gpudispatch.nacos;

import com.alibaba.nacos.api.common.Constants;
import com.alibaba.nacos.api.remote.request.Request;
import com.alibaba.nacos.auth.AuthManager;
import com.alibaba.nacos.auth.exception.AccessException;
import com.alibaba.nacos.auth.model.Permission;
import com.alibaba.nacos.auth.model.User;
import com.alibaba.nacos.config.server.utils.RequestUtil;
import io.jsonwebtoken.ExpiredJwtException;
import javax.servlet.http.HttpServletRequest;
import org.springframework.beans.factory.annotation.Autowired;
import org.springframework.stereotype.Component;

/**
 * Nacos's own auth system ({@code nacos.core.auth.system.type=nacos}), seen from a client as
 * Nacos 2.0.4 shows it: Nacos's filters ({@code AuthFilter} for HTTP, {@code RemoteRequestAuthFilter}
 * for gRPC) call {@link #login}/{@link #loginRemote} and then {@link #auth} for every request to a
 * {@code @Secured} API while {@code nacos.core.auth.enabled=true}.
 *
 * <p>A request is identified by its token: the {@code Authorization: Bearer <token>} header, else
 * the {@code accessToken} parameter (HTTP) or header (gRPC), else a token made on the spot from its
 * {@code username} and {@code password} parameters (headers). The refusals carry Nacos's messages:
 * "user not found!" (no token, no user), "token expired!", "token invalid!", "unknown user!" (wrong
 * user or password), "authorization failed!" (no permission); the filters answer them with HTTP 403
 * or a gRPC response with error code 403.
 */
@Component
public class UsersAuthManager implements AuthManager {

    static final String AUTHORIZATION_HEADER = "Authorization";

    static final String TOKEN_PREFIX = "Bearer ";

    @Autowired
    private TokenManager tokens;

    @Autowired
    private UserStore store;

    @Override
    public User login(Object request) throws AccessException {
        HttpServletRequest req = (HttpServletRequest) request;
        String token = bearer(req.getHeader(AUTHORIZATION_HEADER));
        if (isBlank(token)) {
            token = req.getParameter(Constants.ACCESS_TOKEN);
        }
        if (isBlank(token)) {
            token = tokenFor(req.getParameter("username"), req.getParameter("password"));
        }
        AuthUser user = identify(token);
        // Where Nacos's config module looks for the user making a change (RequestUtil.getSrcUserName).
        req.getSession().setAttribute(RequestUtil.NACOS_USER_KEY, user);
        req.setAttribute(RequestUtil.NACOS_USER_KEY, user);
        return user;
    }

    @Override
    public User loginRemote(Object request) throws AccessException {
        Request req = (Request) request;
        String token = bearer(req.getHeader(AUTHORIZATION_HEADER));
        if (isBlank(token)) {
            token = req.getHeader(Constants.ACCESS_TOKEN);
        }
        if (isBlank(token)) {
            token = tokenFor(req.getHeader("username"), req.getHeader("password"));
        }
        return identify(token);
    }

    @Override
    public void auth(Permission permission, User user) throws AccessException {
        if (!store.hasPermission(user.getUserName(), permission)) {
            throw new AccessException("authorization failed!");
        }
    }

    /** A token for a user name and password (the login endpoint's way in); "unknown user!" if wrong. */
    String tokenFor(String username, String password) throws AccessException {
        if (isBlank(username)) {
            return null; // nothing to log in with: identify() says "user not found!"
        }
        if (!store.passwordMatches(username, password)) {
            throw new AccessException("unknown user!");
        }
        return tokens.createToken(username);
    }

    private AuthUser identify(String token) throws AccessException {
        if (isBlank(token)) {
            throw new AccessException("user not found!");
        }
        String username;
        try {
            username = tokens.userOf(token);
        } catch (ExpiredJwtException e) {
            throw new AccessException("token expired!");
        } catch (Exception e) {
            throw new AccessException("token invalid!");
        }
        AuthUser user = new AuthUser();
        user.setUserName(username);
        user.setToken(token);
        user.setGlobalAdmin(store.isGlobalAdmin(username));
        return user;
    }

    private static String bearer(String header) {
        return header != null && header.startsWith(TOKEN_PREFIX) ? header.substring(TOKEN_PREFIX.length()) : null;
    }

    private static boolean isBlank(String value) {
        return value == null || value.trim().isEmpty();
    }
}
